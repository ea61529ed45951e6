"""Command line: `python -m runner.classify MODEL IMAGE_OR_DIR... [--top-k 5] [--json]`.

A thin entry point: TensorFlow is imported quietly first, then runner/export/classify.py does the work.
"""
if __name__ == "__main__":
    from runner.tf_quiet import import_tensorflow
    import_tensorflow()
    from common.cli import exit_with
    from runner.export.classify import main
    exit_with(main())
