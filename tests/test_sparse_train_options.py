"""`thrifty train --grad-nm/--grad-method/--grad-gemms/--act-nm` (the actgrad-nm training option)."""
import argparse

import pytest
import yaml

from thrifty.cli import main
from thrifty.sparse.actgrad import ActNM, GradNM
from thrifty.sparse.train_options import _add, act_config, grad_config
from thrifty.train.options import training_options


def _args(*argv):
    p = argparse.ArgumentParser()
    _add(p)
    return p.parse_args(list(argv))


def test_option_is_discovered_and_parses_flags():
    assert "actgrad-nm" in {o.name for o in training_options()}
    assert grad_config(_args()) is None and act_config(_args()) is None
    assert grad_config(_args("--grad-nm", "1:2", "--grad-method", "mse", "--grad-gemms", "weight")) == \
        GradNM(1, 2, method="mse", gemms=("weight",))
    assert act_config(_args("--act-nm", "2:4")) == ActNM(2, 4)
    with pytest.raises(ValueError, match="--grad-nm"):
        grad_config(_args("--grad-nm", "4:2"))
    with pytest.raises(ValueError, match="--grad-gemms"):
        grad_config(_args("--grad-nm", "2:4", "--grad-gemms", "bias"))


def test_train_cli_with_grad_and_act_nm(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "3", "--optim.batch-size", "32",
                 "--grad-nm", "2:4", "--grad-method", "mvue", "--act-nm", "2:4", "--out", str(out)]) == 0
    opts = yaml.safe_load((out / "model.yaml").read_text())["options"]["actgrad-nm"]
    assert opts["grad"]["kind"] == "GradNM" and (opts["grad"]["n"], opts["grad"]["m"]) == (2, 4)
    assert opts["act"]["kind"] == "ActNM"
    assert main(["train", "--model", "mlp", "--dataset", "digits", "--optim.steps", "1", "--grad-nm", "2-4",
                 "--out", str(tmp_path / "bad")]) == 2
