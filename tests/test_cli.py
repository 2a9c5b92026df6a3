"""The `jaxmu` command: subcommands, configs by short name, help, bad commands; and (e2e) the wheel
installed outside the checkout."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from jaxmu import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_module_is_a_subcommand_with_a_one_line_summary():
  names = cli.commands()
  modules = {p.stem.replace("_", "-") for p in (ROOT / "jaxmu" / "commands").glob("*.py")}
  assert set(names) == modules - {"--init--"}
  assert {"deepunlearn", "ulira", "iam", "iam-matrix", "audit", "plan", "prepare-data",
          "benchmark"} <= set(names)
  assert all(summary and "\n" not in summary for summary in names.values())


def test_short_config_names_resolve_to_package_files_and_paths_pass_through(tmp_path):
  resolved = cli.resolve_config("deepunlearn:dataset=cifar10,model=resnet18")
  path, _, args = resolved.partition(":")
  assert Path(path) == cli.CONFIGS_DIR / "deepunlearn.py" and Path(path).is_file()
  assert args == "dataset=cifar10,model=resnet18"
  assert cli.resolve_config("quickstart") == str(cli.CONFIGS_DIR / "quickstart.py")
  own = tmp_path / "mine.py"
  assert cli.resolve_config(f"{own}:x") == f"{own}:x"
  assert cli.resolve_config("nosuchconfig") == "nosuchconfig"  # config_flags then names it
  assert set(cli.config_names()) >= {"deepunlearn", "ulira", "iam", "quickstart", "bench"}


def test_help_lists_commands_and_unknown_command_is_one_line(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["jaxmu", "--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert "iam-matrix" in out and "quickstart" in out
  with pytest.raises(SystemExit) as exit_:
    cli.main(["jaxmu", "unlern"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown command 'unlern'" in err[0] and "deepunlearn" in err[0]


def test_subcommand_help_shows_its_docstring_and_its_flags():
  out = subprocess.run([sys.executable, "-m", "jaxmu", "plan", "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("The plan of a pipeline run")
  assert "--rate_tflops" in out.stdout and "NAME[:args]" in out.stdout


def test_a_short_config_name_runs_a_subcommand_from_any_directory(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jaxmu", "plan", "--config=quickstart:iam",
                        f"--workdir={tmp_path}", "--compilation_cache="],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "plan.md").read_text().startswith("# Plan: iam: digits")


@pytest.mark.e2e
def test_wheel_installed_outside_the_checkout_gives_a_working_command(tmp_path):
  """Builds the wheel, installs it with --no-deps into a fresh venv that sees .venv's packages
  through a .pth file, and runs `jaxmu --help` and a tiny `jaxmu audit` from outside the
  checkout."""
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
  [wheel] = wheels.glob("jaxmu-*.whl")
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=False)
  python = env_dir / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  deps = [p for p in sys.path if p.endswith("site-packages")]
  Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                  "-q", str(wheel)], check=True, timeout=300)
  command = env_dir / "bin" / "jaxmu"
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  where = subprocess.run([str(python), "-c", "import jaxmu; print(jaxmu.__file__)"], cwd=outside,
                         capture_output=True, text=True, check=True).stdout
  assert str(ROOT) not in where and str(env_dir) in where
  help_ = subprocess.run([str(command), "--help"], cwd=outside, capture_output=True, text=True,
                         timeout=120)
  assert help_.returncode == 0 and "audit" in help_.stdout and "iam" in help_.stdout

  import numpy as np
  rng = np.random.default_rng(0)
  n, c, k = 40, 3, 2
  labels = rng.integers(0, c, n)
  logits = {"original": rng.normal(size=(n, c)), "target": rng.normal(size=(n, c)),
            "shadows": rng.normal(size=(k, n, c)), "labels": labels,
            "forget": np.arange(n) < 10}
  np.savez(outside / "logits.npz", **logits)
  audit = subprocess.run([str(command), "audit", "--logits=logits.npz", "--out=out",
                          "--attacks=iam_on,lira_on", "--compilation_cache="], cwd=outside,
                         capture_output=True, text=True, timeout=300)
  assert audit.returncode == 0, audit.stderr[-2000:]
  assert (outside / "out" / "metrics.csv").is_file() and "| IAM-On |" in audit.stdout
