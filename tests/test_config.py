"""crener.config: a leaf that builds every config without torch, as build_run_config does for every
built-in family, and the runtime section's old names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import crener.config as config
from crener.config import RUNTIME_ALIASES, RunConfig, RuntimeConfig, parse_set
from crener.errors import ConfigError
from crener.profiles import build_run_config

# Every profile x model family x variant, built from the config layer alone. A profile's "auto"
# (train.bf16) is resolved on the machine where a run is built (crener.profiles), so it is given
# here as the value it resolves to.
BUILD_EVERY_CONFIG = """
import sys
from crener import registry
from crener.config import RunConfig
from crener.profiles import PROFILES, VARIANTS

built = 0
for profile, values in PROFILES.items():
    for model in registry.names():
        for variant, ablation in (VARIANTS.items() if model == "crener" else [("full", {})]):
            flat = {"model.name": model, **values, **ablation, "profile": profile, "variant": variant}
            flat = {k: (False if v == "auto" else v) for k, v in flat.items()}
            RunConfig.from_flat(flat)
            built += 1
assert built > len(PROFILES), built
assert "torch" not in sys.modules, "building a config imported torch"
leaked = sorted(m for m in sys.modules if m.startswith("crener.") and m.partition(".")[2].split(".")[0]
                not in ("config", "errors", "profiles", "registry", "data"))
assert not leaked, leaked
"""


def test_every_profile_and_model_config_builds_without_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BUILD_EVERY_CONFIG], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


# Every config the command line builds, the way it builds them (crener.profiles.build_run_config):
# every profile x built-in family x the variants it takes x dataset, bare and with --set
# overrides; and the parser of `crener train --help`. A built-in family's settings are data
# (crener/families.toml), so none of it may load torch or a model module. The full profile's
# train.bf16 = "auto" is resolved too: it measures this machine's matmuls in a child process.
BUILD_EVERY_RUN_CONFIG = """
import contextlib, io, sys, tomllib
from crener import registry
from crener.cli import build_parser
from crener.config import parse_set
from crener.data.datasets import DATASETS
from crener.profiles import PROFILES, VARIANTS, build_run_config

with registry.FAMILIES_FILE.open("rb") as f:
    tables = tomllib.load(f)["families"]
builtin = [m for m in registry.names() if m in tables]
assert len(builtin) >= 5, builtin
sets = [[], ["train.lr=0.002", "model.emb_dropout=0.2"], ["runtime.threads=1", "train.progress=false"]]
built = 0
for profile, values in PROFILES.items():
    for model in builtin:
        for variant in VARIANTS if registry.settings(model).ablations else ["full"]:
            for dataset in DATASETS:
                for items in sets:
                    build_run_config(model=model, variant=variant, profile=profile, dataset=dataset,
                                     overrides=parse_set(items))
                    built += 1
assert built == len(PROFILES) * (len(VARIANTS) + len(builtin) - 1) * len(DATASETS) * len(sets), built
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    build_parser().parse_args(["train", "--help"])
from crener.profiles import bf16_auto
assert "auto" in {v.get("train.bf16") for v in PROFILES.values()}
assert isinstance(bf16_auto("auto"), bool)  # measured in a child, once (cached)
assert "torch" not in sys.modules, "building a run's config imported torch"
models = sorted(m for m in sys.modules if m.startswith(("baselines", "crener.model", "crener.encoder")))
assert not models, models
"""


def test_every_run_config_the_command_line_builds_imports_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BUILD_EVERY_RUN_CONFIG], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


# train.bf16 = "auto" in a process without torch: a measurement that fails in the child says which
# device and what to set instead (one that succeeds is BUILD_EVERY_RUN_CONFIG's full profile).
BF16_AUTO_IN_A_CHILD = """
import sys
from crener.profiles import bf16_auto
from crener.errors import CrenerError
try:
    bf16_auto("no-such-device")
except CrenerError as exc:
    assert "runtime.device=no-such-device" in str(exc) and "set train.bf16=true or false" in str(exc), exc
else:
    raise AssertionError("an unknown device resolved")
assert "torch" not in sys.modules
"""


def test_bf16_auto_names_the_device_when_its_child_measurement_fails() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BF16_AUTO_IN_A_CHILD], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def test_config_imports_only_the_standard_library_and_errors() -> None:
    """Inside functions too: a leaf that everything may import, and that imports nothing back."""
    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            imported.add(node.module)
    outside = {m for m in imported if m.partition(".")[0] not in sys.stdlib_module_names}
    assert outside == {"crener.errors"}, outside


def test_old_flat_names_are_aliases_of_the_runtime_section() -> None:
    old = {
        "data.data_root": "/data", "train.progress": "false", "train.device": "cpu", "train.threads": "2",
        "train.heap_tensors": "true", "train.loader_workers": "1", "train.eval_max_cells": "1000",
        "train.eval_every": "5", "model.grid_input": "concat", "model.space_to_batch": "false",
        "model.checkpoint_rounds": "true", "model.checkpoint_above": "8",
    }  # fmt: skip
    assert set(old) == set(RUNTIME_ALIASES)
    want = RuntimeConfig(
        data_root="/data", progress=False, device="cpu", threads=2, heap_tensors=True, loader_workers=1,
        eval_max_cells=1000, eval_every=5, grid_input="concat", space_to_batch=False, checkpoint_rounds=True,
        checkpoint_above=8,
    )  # fmt: skip
    # An old MLflow run's params, an old --set, an old sweep file: each reaches runtime.*
    assert RunConfig.from_flat(old).runtime == want
    assert RunConfig().with_overrides(parse_set([f"{k}={v}" for k, v in old.items()])).runtime == want
    assert build_run_config(profile="smoke", overrides=old).runtime == want
    # An old name overrides the profile's value under the new one (smoke sets runtime.progress).
    assert build_run_config(profile="smoke", overrides={"train.progress": "true"}).runtime.progress
    flat = RunConfig.from_flat(old).flatten()
    assert not set(old) & set(flat) and flat["runtime.device"] == "cpu"  # logged by today's names
    with pytest.raises(ConfigError, match="runtime.device='gpu'"):
        RunConfig().with_overrides({"train.device": "gpu"})


def test_old_sweep_override_files_still_load(tmp_path: Path) -> None:
    from experiments.sweeps import load_overrides

    path = tmp_path / "old.toml"
    path.write_text(
        '[[overrides]]\n[overrides.set]\n"train.threads" = 1\n"model.hidden" = 32\n', encoding="utf-8"
    )
    (override,) = load_overrides(path)
    assert RunConfig().with_overrides(override.values).runtime.threads == 1


ROOT = Path(config.__file__).resolve().parent.parent


def test_profiles_and_variants_are_data() -> None:
    """They live in crener/profiles.toml (packaged); no module holds a profile as a literal."""
    import tomllib

    from crener.profiles import PROFILES, PROFILES_FILE, VARIANTS

    assert PROFILES_FILE.parent == ROOT / "crener" and list(PROFILES)[:2] == ["smoke", "quick"]
    assert list(VARIANTS)[0] == "full" and len(VARIANTS) == 9
    # a per-dataset rule (TENER's depth pattern at paper widths) applies to its dataset only
    assert build_run_config(profile="paper", dataset="weibo").model.tf_layers == 1
    assert build_run_config(profile="paper", dataset="resume").model.tf_layers == 2
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert PROFILES_FILE.name in package_data["crener"]
    for module in ("config.py", "profiles.py"):
        for node in ast.walk(ast.parse((ROOT / "crener" / module).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                flat = [k.value for k in node.keys if isinstance(k, ast.Constant) and "." in str(k.value)]
                assert len(flat) < 3, f"crener/{module}:{node.lineno} holds overrides: {flat[:3]}"


def test_no_comment_in_code_cites_history() -> None:
    """Measurements, machines and issues belong in reports/decisions.md, not in the code."""
    history = re.compile(r"EPYC|Xeon|\bissues? #?\d+|#.*\bF1\b.*\d\.\d")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in ("crener", "experiments", "baselines")
        for path in sorted((ROOT / package).rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if history.search(line)
    ]
    assert not found, "\n".join(found)


def test_train_help_names_each_profiles_encoder_from_the_profiles_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from crener.cli import build_parser
    from crener.profiles import PROFILES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text.replace("- ", "-")  # argparse wraps at hyphens
    for profile in PROFILES:
        encoder = build_run_config(profile=profile, dataset="resume").model.encoder
        assert f"{encoder} in {profile}" in text
    assert "crener-char-18k in quick" in text
