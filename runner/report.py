"""Command line: `python -m runner.report --run RUN_DIR` (plots and text reports; runner/ui/report.py)."""
if __name__ == "__main__":
    from common.cli import exit_with
    from runner.ui.report import main
    exit_with(main())
