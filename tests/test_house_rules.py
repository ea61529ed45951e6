"""The "one X" rules of docs/design.md, checked on the source: one rename-into-place, one reader of the run
directory's records, control flow outside the user-error hierarchy, library modules without import-time side
effects, every module named in docs/design.md."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env

PACKAGES = ("runner", "sync", "common")
SOURCES = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py")) + [REPO / "resume.py"]
RENAME_HOME = REPO / "common" / "files.py"
# tf.io.gfile.rename renames in a bucket as well as on a disk (the cache written by Beam workers)
RENAME_ELSEWHERE_ALLOWED = {REPO / "runner" / "features" / "cache_gfile.py": "gfile"}
RECORD_HOMES = {REPO / "runner" / "run" / "rundir.py", REPO / "runner" / "run" / "records.py"}


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            yield node


def is_rename(call: ast.Call) -> bool:
    """os.replace / os.rename, or a one-argument .replace / .rename (pathlib's rename; str.replace takes two)."""
    func = call.func
    if not isinstance(func, ast.Attribute) or func.attr not in ("replace", "rename"):
        return False
    if isinstance(func.value, ast.Name) and func.value.id in ("os", "shutil"):
        return True
    return len(call.args) == 1 and not call.keywords


def test_every_rename_into_place_goes_through_common_files():
    offenders = [f"{path.relative_to(REPO)}:{call.lineno}" for path in SOURCES if path != RENAME_HOME
                 for call in calls(path) if is_rename(call)
                 and RENAME_ELSEWHERE_ALLOWED.get(path, "\0") not in ast.unparse(call.func)]
    assert not offenders, f"rename with common.files.replace_atomic (fsync, then rename, then fsync the folder): " \
                          f"{offenders}"


def test_no_module_outside_the_run_directory_reads_a_record_field_by_name():
    offenders = []
    for path in SOURCES:
        if path in RECORD_HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            target = node.value if isinstance(node, ast.Subscript) else \
                node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "get" else None
            if target is not None and "marker" in ast.unparse(target).lower():
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"read a checkpoint marker through its typed record (runner/run/records.py): {offenders}"


def test_control_flow_exceptions_are_not_user_errors():
    from common.errors import ProjectError, status_of
    from runner.errors import StopRequested
    from sync.retry import Recover
    flow = [StopRequested, Recover, *Recover.__subclasses__()]
    assert [cls.__name__ for cls in flow if issubclass(cls, ProjectError)] == []
    assert status_of(Recover("escaped"))[0] == 1, "a Recover that escapes its loop is a bug, not the user's problem"


def library_modules() -> list[str]:
    """Every module of runner/, sync/ and common/ except command-line entry points (run as __main__)."""
    names = []
    for path in SOURCES[:-1]:
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text(encoding="utf-8") \
                and path.parent.name == "runner":
            continue
        names.append(module.removesuffix(".__init__"))
    return names


THIRD_PARTY = ("tensorflow", "keras", "apache_beam", "matplotlib.figure", "googleapiclient.discovery", "tqdm", "h5py")


def test_importing_a_library_module_has_no_side_effect():
    """No module changes the environment, the standard streams or the logging set-up when imported."""
    probe = ("import logging, os, sys, importlib\n"
             f"for name in {THIRD_PARTY!r}:\n"
             "    importlib.import_module(name)  # their own import-time set-up is theirs\n"
             "before = (dict(os.environ), sys.stdout, sys.stderr, logging.getLogger().handlers[:])\n"
             f"for name in {library_modules()!r}:\n"
             "    importlib.import_module(name)\n"
             "after = (dict(os.environ), sys.stdout, sys.stderr, logging.getLogger().handlers[:])\n"
             "changed = [k for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k)]\n"
             "assert before[1:] == after[1:] and not changed, changed\n")
    env = {k: v for k, v in child_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_docs_design_names_every_module():
    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    missing = [p.relative_to(REPO).as_posix() for p in SOURCES if p.name != "__init__.py" and p.name not in design]
    assert not missing, f"docs/design.md does not describe {missing}"


@pytest.mark.parametrize("command", ["runner.classify", "runner.report", "runner.beam", "runner.export"])
def test_the_user_commands_are_thin_entry_points_that_still_answer_help(command):
    result = subprocess.run([sys.executable, "-m", command, "--help"], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage: python -m" in result.stdout, result.stdout + result.stderr


def test_the_sync_prefix_is_written_once_where_a_message_is_shown():
    import re
    from common.errors import status_of
    from sync.errors import SyncError, TransferError
    pattern = re.compile(r"""(raise|return) [\w.]+\(f?["']sync: |removeprefix\(["']sync: """)
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in SOURCES
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, f"an error's message carries no 'sync: ' (SyncError.origin adds it when shown): {offenders}"
    assert status_of(SyncError("the folder is gone"))[1] == "sync: the folder is gone"
    assert status_of(TransferError("upload failed"))[1].startswith("sync: upload failed Nothing was lost")
