"""The fine-tuning loss: in-batch softmax with logQ correction and same-user masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.training.train import TrainConfig, Trainer


@pytest.fixture
def trainer(generic_dataset_dir: Path, tmp_path: Path) -> Trainer:
    return Trainer(TrainConfig(dataset=str(generic_dataset_dir), out=str(tmp_path / "out"), max_len=16))


def _manual(t: Trainer, contexts: list[str], targets: list[str], log_q: list[float] | None) -> torch.Tensor:
    with torch.no_grad():
        p = t.model(**t._tokens(contexts))
        h = t.model(**t._tokens([t.item_text[x] for x in targets]))
        logits = t.log_alpha.exp() * p @ h.T
        if log_q is not None:
            logits = logits - torch.tensor(log_q)
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(targets)))


def test_logq_subtracts_log_frequency_from_the_logits(trainer: Trainer) -> None:
    ctx, tgt = ["amber basil gadget", "cedar delta gadget", "ember fjord gadget"], ["i0", "i1", "i2"]
    trainer.model.eval()
    trainer.log_q = {"i0": -1.0, "i1": -2.0, "i2": -5.0}
    with torch.no_grad():
        corrected = trainer.loss(ctx, tgt)
        trainer.cfg = trainer.cfg.model_copy(update={"logq": False})  # TrainConfig is frozen
        plain = trainer.loss(ctx, tgt)
        trainer.cfg = trainer.cfg.model_copy(update={"logq": True})
    assert corrected.item() == pytest.approx(_manual(trainer, ctx, tgt, [-1.0, -2.0, -5.0]).item(), rel=1e-5)
    assert plain.item() == pytest.approx(_manual(trainer, ctx, tgt, None).item(), rel=1e-5)
    assert corrected.item() != pytest.approx(plain.item(), rel=1e-3)


def test_another_item_of_the_same_user_is_not_a_negative(trainer: Trainer) -> None:
    ctx = ["amber basil gadget", "amber basil gadget", "ember fjord gadget"]
    tgt = ["i0", "i1", "i2"]
    trainer.model.eval()
    trainer.log_q = {}
    with torch.no_grad():
        masked = trainer.loss(ctx, tgt, ["u", "u", "v"]).item()
        unmasked = trainer.loss(ctx, tgt).item()
        distinct = trainer.loss(ctx, tgt, ["u", "w", "v"]).item()
        # rows 0 and 1 drop each other's target from their negatives: exactly two logits less
        p = trainer.model(**trainer._tokens(ctx))
        h = trainer.model(**trainer._tokens([trainer.item_text[x] for x in tgt]))
        logits = trainer.log_alpha.exp() * p @ h.T
        logits[0, 1] = logits[1, 0] = float("-inf")
        expected = torch.nn.functional.cross_entropy(logits, torch.arange(3)).item()
    assert masked == pytest.approx(expected, rel=1e-5)
    assert masked < unmasked and distinct == pytest.approx(unmasked, rel=1e-6)


def test_freeze_layers_stops_gradients_below_the_cut(trainer: Trainer) -> None:
    from inference.training.train import _freeze

    enc = trainer.model.encoder
    _freeze(enc, 2)
    assert not any(p.requires_grad for p in enc.embeddings.parameters())
    assert not any(p.requires_grad for p in enc.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in enc.encoder.layer[2].parameters())
    with pytest.raises(ValueError, match="only 6 layers"):
        _freeze(enc, 7)
