"""jdiff as a user installs it: a wheel built from this checkout holds the config tree, and once installed into a
fresh virtual environment the ``jdiff`` command (and ``python -m jdiff.main``) runs the demo from any folder, prints
its help and completes on the shell; an editable install uses the checkout's own conf/.

The environments get only jdiff itself (``--no-deps``); its dependencies come from the interpreter running the tests,
whose site-packages a .pth file adds (a plain folder on sys.path: that folder's own .pth files, such as an editable
jdiff's finder, are not run, so the jdiff imported is the one installed here)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import CONF, REPO

# What the build reads: pyproject.toml's readme, setup.py's conf/ mapping, the package.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "jdiff", "conf", "hydra_plugins")


def call(args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def copy_sources(target: Path) -> Path:
    """The build inputs of this checkout (as they are now, committed or not), without build leftovers."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    target.mkdir(parents=True)
    for name in BUILD_INPUTS:
        source = REPO / name
        shutil.copytree(source, target / name, ignore=ignore) if source.is_dir() else shutil.copy2(source, target)
    return target


def make_venv(path: Path) -> SimpleNamespace:
    """An empty virtual environment that sees this interpreter's site-packages (the dependencies) after its own."""
    call([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    purelib = Path(call([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "_jdiff_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return SimpleNamespace(root=path, python=python, jdiff=path / "bin" / "jdiff", purelib=purelib, env=env)


def pip_install(venv: SimpleNamespace, *args) -> None:
    call([sys.executable, "-m", "pip", "--python", venv.python, "install", "--no-deps", "--no-build-isolation",
          "--no-index", *args])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SimpleNamespace:
    """A wheel of this checkout, installed into a fresh environment."""
    root = tmp_path_factory.mktemp("install")
    src = copy_sources(root / "src")
    call([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          root / "dist", src])
    (wheel,) = (root / "dist").glob("jdiff-*.whl")
    venv = make_venv(root / "venv")
    pip_install(venv, wheel)
    outside = root / "elsewhere"  # no checkout here or above
    outside.mkdir()
    return SimpleNamespace(wheel=wheel, venv=venv, cwd=outside)


def run_installed(built, args, **env) -> subprocess.CompletedProcess:
    return call(args, cwd=built.cwd, env={**built.venv.env, **env})


def test_the_wheel_holds_every_config_file_and_the_command(built):
    names = set(zipfile.ZipFile(built.wheel).namelist())
    expected = {f"jdiff/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert len(expected) > 30 and expected <= names, sorted(expected - names)
    assert {f"jdiff/{p.relative_to(REPO / 'jdiff').as_posix()}" for p in (REPO / "jdiff").rglob("*.py")} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(built.wheel).read(entry_points).decode()
    assert "[console_scripts]" in text and "jdiff = jdiff.main:cli" in text


def test_the_installed_package_reads_its_own_config_tree(built):
    done = run_installed(built, [built.venv.python, "-c",
                                 "import jdiff, jdiff.confdir as c; print(jdiff.__file__); print(c.CONF_DIR)"])
    module, conf = map(Path, done.stdout.split())
    assert module == built.venv.purelib / "jdiff" / "__init__.py"
    assert conf == built.venv.purelib / "jdiff" / "conf" and (conf / "config.yaml").is_file()
    job = run_installed(built, [built.venv.python, "-m", "jdiff.main", "--cfg", "job", "experiment=demo"])
    cfg = yaml.safe_load(job.stdout)
    assert cfg["model"]["name"] == "tiny" and cfg["style"] == "00" and cfg["data"]["builder"] == "demo"


def test_the_jdiff_command_runs_the_demo_outside_the_checkout(built):
    # Every stage, shortened, on the torch engine: Jittor keys its compiled operators by the interpreter's path, so
    # in a new environment its first run recompiles them all (minutes on 2 cores); the package is the same.
    run_installed(built, [built.venv.jdiff, "experiment=demo", "engine=torch", "train.steps=4", "infer.steps=3"])
    (run_dir,) = (built.cwd / "outputs").glob("*/*_style00")
    for name in ("scores.json", "lora.safetensors", "contact_sheet.png", ".hydra/hydra.yaml"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "images").glob("*.png"))) > 0
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {s["provider"]: s["path"] for s in hydra["runtime"]["config_sources"]}
    assert sources["main"] == str(built.venv.purelib / "jdiff" / "conf")  # the wheel's tree, not the repo's
    assert (built.cwd / "data" / "cache" / "models").is_dir()  # paths.root: the folder it was started from


def test_the_jdiff_command_prints_its_help(built):
    text = run_installed(built, [built.venv.jdiff, "--help"]).stdout
    assert "engine=jittor" in text and "options: jittor jittor_fast torch torch_fast" in text
    assert len(text.splitlines()) < 80


def test_bash_completion_of_the_jdiff_command(built):
    script = run_installed(built, [built.venv.jdiff, "--shell-completion", "install=bash"]).stdout
    assert script.rstrip().endswith("complete -o nospace -o default -F hydra_bash_completion jdiff")
    assert "complete -p jdiff" in script
    query = run_installed(built, [built.venv.jdiff, "-sc", "query=bash"], COMP_LINE="jdiff engine=").stdout.split()
    assert {"engine=jittor", "engine=jittor_fast", "engine=torch", "engine=torch_fast"} <= set(query)
    # the installed script in bash, as the shell calls it on <TAB> after `jdiff style=03 engine=t`
    line = "jdiff style=03 engine=t"
    shell = run_installed(built, ["bash", "-c", f'eval "$(jdiff --shell-completion install=bash)"\n'
                                                f'COMP_LINE="{line}" COMP_POINT={len(line)} COMP_CWORD=2\n'
                                                'hydra_bash_completion\nprintf "%s\\n" "${COMPREPLY[@]}"'])
    assert {"engine=torch", "engine=torch_fast"} <= set(shell.stdout.split()), shell.stdout
    assert all(word.startswith("engine=t") for word in shell.stdout.split())


def test_an_editable_install_reads_the_checkouts_config_tree(tmp_path):
    src = copy_sources(tmp_path / "src")
    venv = make_venv(tmp_path / "venv")
    pip_install(venv, "-e", src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = call([venv.python, "-c", "import jdiff.confdir as c; print(c.CONF_DIR)"], cwd=elsewhere, env=venv.env)
    assert Path(done.stdout.strip()) == src / "conf"
    job = call([venv.jdiff, "--cfg", "job", "experiment=demo", "seed=3"], cwd=elsewhere, env=venv.env)
    assert yaml.safe_load(job.stdout)["seed"] == 3
    # A sweep from outside the checkout finds jdiff's launcher, which the editable install serves through an
    # import hook that Hydra's plugin scan does not list.
    call([venv.jdiff, "-m", "experiment=demo", "engine=torch", "train.steps=1", "infer.steps=2", "seed=3,4",
          "sweep.name=s"], cwd=elsewhere, env=venv.env)
    runs = sorted((elsewhere / "multirun" / "s").glob("*seed=*"))
    assert len(runs) == 2 and all((run / "COMPLETE").is_file() for run in runs), runs
