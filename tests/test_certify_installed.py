"""The suite works from an installed package, outside any checkout (issue 7).

``pip install .`` into a fresh virtual environment, then, in an empty directory,
``pytest --pyargs netkernel.conformance --target …``: the ``pytest11`` entry point
loads the plugin and the spec travels as package data (netkernel/spec/). The
source is a copy of the checkout without its build products, and the report
proves which copy ran: the suite and the spec it names are the venv's.

One test, ~40 s: a wheel build (the C fast path included), then two short runs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "site", "*.egg-info",
                               "__pycache__", ".hypothesis", ".*_cache", "*.so", "nk-agent",
                               "*.json", "bench-out", ".benchmarks", "examples")


def test_installed_package_certifies_outside_the_checkout(tmp_path: Path) -> None:
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "empty"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    # --system-site-packages: pytest, hypothesis, construct, cffi come from this environment;
    # netkernel itself only from the wheel (--no-deps; the build gets its own setuptools)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(src)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=env).stdout.strip())
    assert (site / "netkernel" / "spec" / "nqe.md").is_file()

    work.mkdir()
    nsm = (f"exec:{shlex.quote(str(python))} -m netkernel.reference.nsm_kernel"
           " --instance {instance}")
    suite = "netkernel.conformance."
    for target, tests in (
            ("reference", [suite + "test_nqe::test_encoder_refuses_nonzero_reserved",
                           suite + "test_runtime::test_status_reports_devices_sockets_and_"
                                   "counters"]),
            (nsm, [suite + "test_nsm::test_nsm_attaches_to_its_instance_and_serves"])):
        out = work / ("ref" if target == "reference" else "nsm")
        run = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", *tests,
             "--target", target, "--nk-certify", "--nk-report-dir", str(out),
             "--nk-target-version", "9.9"],
            cwd=work, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        doc = json.loads((out / "report.json").read_text())
        # the installed copy ran, not the checkout's
        assert Path(doc["suite"]["path"]) == site / "netkernel" / "conformance"
        assert Path(doc["spec"]["path"]) == site / "netkernel" / "spec"
        assert doc["spec"]["version"] == "v1"
        assert doc["target"] == target and doc["verdict"]["passed"]
        assert doc["implementation"]["version"] == "9.9"
        passed = [rid for rid, e in doc["requirements"].items() if e["status"] == "passed"]
        assert passed, doc["summary"]
        assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "report.html",
                                                   "junit.xml", "logs"}
        assert run.stdout.rstrip().endswith("exit status: 0")
    assert not any(work.glob("conftest.py")) and not (work / "spec").exists()
