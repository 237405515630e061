"""Every config a person writes refuses a field it does not know, and says which one.

Pydantic's default ignores unknown fields: ``{"good_wieght": 3}`` in a recipe file would train with the
default weight and report nothing, and a benchmark run with it would measure the wrong recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError

torch = pytest.importorskip("torch")  # the training-side configs import it

from pipeline.adapt import LabelFreeConfig  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.data.augment import AugmentConfig  # noqa: E402
from pipeline.demo import DemoConfig  # noqa: E402
from pipeline.export.quantize import QuantConfig  # noqa: E402
from pipeline.gate import GateConfig  # noqa: E402
from pipeline.metadata import ModelMetadata, load_metadata  # noqa: E402
from pipeline.preprocess import PreprocessSpec  # noqa: E402
from pipeline.run import RunConfig  # noqa: E402
from pipeline.runtime import RuntimeOptions  # noqa: E402
from pipeline.supervised_adapt import SupervisedAdaptConfig  # noqa: E402
from pipeline.train import TrainConfig  # noqa: E402

CONFIGS: list[tuple[type[BaseModel], dict]] = [
    (TrainConfig, {}), (RunConfig, {"data_dir": "d", "out_dir": "o"}), (AugmentConfig, {}), (GateConfig, {}),
    (QuantConfig, {}), (RuntimeOptions, {}), (DemoConfig, {}), (LabelFreeConfig, {}), (SupervisedAdaptConfig, {}),
    (PreprocessSpec, {}),
]


@pytest.mark.parametrize(("cls", "required"), CONFIGS, ids=[c.__name__ for c, _ in CONFIGS])
def test_an_unknown_field_is_refused_by_name(cls: type[BaseModel], required: dict) -> None:
    cls(**required)  # the required fields alone are valid
    with pytest.raises(ValidationError, match="misspelt_field"):
        cls(**required, misspelt_field=1)


def test_deployment_settings_refuse_an_unknown_field() -> None:
    pytest.importorskip("prefect")
    from flows.deployments import DeploymentSettings

    with pytest.raises(ValidationError, match="work_pol"):
        DeploymentSettings(work_pol="gpu")


def test_a_model_whose_preprocessing_this_version_does_not_know_is_refused(tmp_path: Path) -> None:
    """A newer trainer's preprocessing step would be skipped silently here: skew. The model is refused."""
    meta = ModelMetadata(classes=["good", "spot"], good_class="good", preprocess=PreprocessSpec(), threshold=0.5,
                         backbone="efficientnet_lite0", embedding_dim=8, train_manifest_sha256="0" * 64)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    (tmp_path / "model.json").write_text(meta.to_json())
    assert load_metadata(onnx).preprocess == PreprocessSpec()
    raw = json.loads(meta.to_json())
    raw["preprocess"]["future_step"] = 2.0
    (tmp_path / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ValidationError, match="future_step"):
        load_metadata(onnx)


def _train(tmp_path: Path, config_text: str) -> tuple[int, str]:
    (tmp_path / "data" / "good").mkdir(parents=True)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(config_text)
    res = CliRunner().invoke(main, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                    "--config", str(cfg)])
    assert not (tmp_path / "run").exists(), "a refused config must not start a run"
    return res.exit_code, res.output


def test_train_refuses_a_misspelt_recipe_field(tmp_path: Path) -> None:
    code, out = _train(tmp_path, "good_wieght: 3\nhead_steps: 5\n")
    assert code == 2 and "good_wieght" in out and "recipe.yaml" in out, out


def test_train_refuses_a_config_that_is_no_mapping(tmp_path: Path) -> None:
    code, out = _train(tmp_path, "- head_steps\n- 5\n")
    assert code == 2 and "expected a mapping" in out, out


def test_train_refuses_a_gate_section(tmp_path: Path) -> None:
    code, out = _train(tmp_path, "head_steps: 5\ngate:\n  require_improvement: true\n")
    assert code == 2 and "gate" in out and "retrain" in out, out


def test_the_example_recipe_loads_and_spells_out_the_defaults() -> None:
    """deploy/train.example.yaml is what a site copies: every key must exist and say the default it claims."""
    from pipeline.cli.adapt_cmd import load_run_config

    train, gate = load_run_config(Path(__file__).resolve().parents[1] / "deploy" / "train.example.yaml")
    assert TrainConfig(**train) == TrainConfig()
    assert gate is not None and GateConfig(**gate) == GateConfig()
