"""Command line: `python -m runner.export --run RUN_DIR [--step N] [--formats ...] [--out FOLDER]`
(runner/export/exporter.py does the work)."""
from runner.tf_quiet import import_tensorflow

import_tensorflow()

from common.cli import exit_with  # noqa: E402 - after TensorFlow's quiet import
from runner.export.exporter import main  # noqa: E402

exit_with(main())
