"""CompileModules: a compiled step equals the eager one (aot_eager on CPU: the traced graph, no code generation)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl.batches import Episode
from lightning_mtl.callbacks import CompileModules
from lightning_mtl.meta import MAML, ProtoNet

sys.path.insert(0, str(Path(__file__).parent / "mtl"))
from toy import global_batches, make_model  # noqa: E402


def episodes(steps=2) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    return [Episode(torch.randn(2, 6, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(2).expand(2, -1).clone(),
                    torch.randn(2, 6, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(2).expand(2, -1).clone(),
                    3) for _ in range(steps)]


def fit(model, data, callbacks) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=len(data), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))


def protonet() -> ProtoNet:
    torch.manual_seed(0)
    return ProtoNet(backbone=nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()))


@pytest.mark.parametrize("kind", ["protonet", "multitask"])
def test_compiled_training_equals_eager(kind):
    make = protonet if kind == "protonet" else (lambda: make_model("equal"))
    data = episodes() if kind == "protonet" else global_batches(2)
    eager, compiled, callback = make(), make(), CompileModules(backend="aot_eager")
    fit(eager, data, [])
    fit(compiled, data, [callback])
    assert callback.compiled == (["backbone"] if kind == "protonet" else ["architecture"])
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # compiled in place: same names
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_the_maml_family_is_refused():
    with pytest.raises(ValueError, match="functional_call"):
        model = MAML(ways=3, image_shape=(1, 8, 8), backbone=nn.Flatten())
        fit(model, episodes(1), [CompileModules(backend="aot_eager")])
