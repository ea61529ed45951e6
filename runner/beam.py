"""Command line: `python -m runner.beam --config FILE [beam options]` (extraction on Apache Beam;
runner/features/beam.py does the work)."""
if __name__ == "__main__":
    from runner.tf_quiet import import_tensorflow
    import_tensorflow()
    from common.cli import exit_with
    from runner.features.beam import main
    exit_with(main())
