"""PCGrad against hand-computed projections; GradVac's EMA state in checkpoints and across dtype moves."""

from __future__ import annotations

import torch

from lightning_mtl.mtl.balancing import create_balancer


def test_pcgrad_orthogonal_gradients_pass_through():
    matrix = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -3.0]])
    out = create_balancer("pcgrad", ["a", "b", "c"])(matrix)
    torch.testing.assert_close(out, matrix.sum(0))  # torchjd's PCGrad sums the (unchanged) gradients


def test_pcgrad_non_conflicting_gradients_pass_through():
    matrix = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(create_balancer("pcgrad", ["a", "b"])(matrix), torch.tensor([2.0, 1.0]))


def test_pcgrad_removes_exactly_the_conflicting_component():
    g1, g2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-2.0, 1.0, 0.5])
    assert g1 @ g2 < 0
    g1_pc = g1 - (g1 @ g2) / (g2 @ g2) * g2  # each projected against the other's original gradient
    g2_pc = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert torch.isclose(g1_pc @ g2, torch.tensor(0.0), atol=1e-6)
    for seed in range(3):  # the visiting order is random but irrelevant for two tasks
        torch.manual_seed(seed)
        out = create_balancer("pcgrad", ["a", "b"])(torch.stack([g1, g2]))
        torch.testing.assert_close(out, g1_pc + g2_pc)


def _aligned_then_less_aligned():
    g = torch.tensor([1.0, 0.0, 0.0, 0.0])
    first = [torch.stack([g, g + torch.tensor([0.0, 0.1, 0.0, 0.0])]) for _ in range(2)]  # cosine ~ 1
    later = torch.stack([g, torch.tensor([1.0, 1.0, 0.0, 0.0])])  # cosine ~ 0.71: below the learnt target
    return first, later


def test_gradvac_ema_targets_are_checkpointed():
    first, later = _aligned_then_less_aligned()
    trained = create_balancer("gradvac", ["a", "b"])
    for m in first:
        trained(m)
    state = trained.state_dict()
    assert any(key.endswith("_phi_t") for key in state)
    restored = create_balancer("gradvac", ["a", "b"])
    restored.load_state_dict(state)
    fresh = create_balancer("gradvac", ["a", "b"])
    torch.manual_seed(0)
    expected = trained(later)
    torch.manual_seed(0)
    torch.testing.assert_close(restored(later), expected, atol=0, rtol=0)
    # With zero targets a positive cosine is left alone: the learnt targets do change the answer.
    torch.testing.assert_close(fresh(later), later.sum(0))
    assert not torch.allclose(expected, later.sum(0))


def test_gradvac_survives_dtype_moves_of_the_module():
    first, later = _aligned_then_less_aligned()
    reference = create_balancer("gradvac", ["a", "b"])
    moved = create_balancer("gradvac", ["a", "b"])
    for m in first:
        reference(m)
        moved(m)
    moved.half()  # e.g. a "16-true" Trainer casts every buffer; the EMA targets must stay float32 on the CPU
    torch.manual_seed(0)
    out = moved(later)
    torch.manual_seed(0)
    torch.testing.assert_close(out, reference(later), atol=1e-3, rtol=1e-3)  # targets rounded to fp16 once
    assert out.dtype == torch.float32
