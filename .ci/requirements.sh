# The requirement files CI installs on both stacks, one per line: an optional stack's file is one more line.
REQUIREMENTS=(
    requirements.txt
    requirements-beam.txt
    requirements-datasets.txt
)
