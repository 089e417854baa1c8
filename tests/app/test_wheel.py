"""The package as a user installs it: a built wheel (not the source tree) carries the recipes and the tuned MoE
configs, and `python -m eagle_trainer.train` from it trains; a user's own recipe directory is searched."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """The wheel of this checkout, built and installed into a directory of its own (no dependencies: the test's
    environment has them)."""
    work = tmp_path_factory.mktemp("wheel")
    # built from a copy of the package's files: the build leaves its build/ folder beside the sources
    source = work / "src"
    shutil.copytree(ROOT / "eagle_trainer", source / "eagle_trainer", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(work / "dist"),
                    str(source)], check=True, cwd=work)
    (wheel,) = (work / "dist").glob("eagle_trainer-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(work / "site"),
                    str(wheel)], check=True)
    return work / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install of the source tree
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_carries_recipes_and_moe_configs(wheel_site):
    package = wheel_site / "eagle_trainer"
    assert (package / "recipes" / "config.yaml").is_file()
    assert len(list((package / "recipes").rglob("*.yaml"))) == len(list((ROOT / "eagle_trainer/recipes").rglob("*.yaml")))
    assert {p.name for p in (package / "kernels/moe/configs").glob("*.json")} == {
        p.name for p in (ROOT / "eagle_trainer/kernels/moe/configs").glob("*.json")}


def test_the_installed_package_trains_outside_the_tree(wheel_site, tmp_path):
    which = run_installed(wheel_site, tmp_path, "-c", "import eagle_trainer; print(eagle_trainer.__file__)")
    assert which.stdout.strip().startswith(str(wheel_site)), which.stdout
    done = run_installed(wheel_site, tmp_path, "-m", "eagle_trainer.train", "demo.num_prompts=24",
                         "demo.num_eval_prompts=8", "demo.max_new_tokens=8", "train.max_steps=2", "train.save_every=0",
                         "accept.enabled=false", f"train.run_dir={tmp_path / 'run'}", "train.progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run/export/sglang/model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["split"] == "train") == 2


def test_a_user_recipe_directory_is_searched(wheel_site, tmp_path):
    """--config-dir adds the user's directory to the recipe search path: their experiments sit beside ours."""
    mine = tmp_path / "my_recipes" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\noptim:\n  lr: 0.000123\n")
    shown = run_installed(wheel_site, tmp_path, "-m", "eagle_trainer.train", "--config-dir",
                          str(tmp_path / "my_recipes"), "+experiment=mine", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "lr: 0.000123" in shown.stdout
