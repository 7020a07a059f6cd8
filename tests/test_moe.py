"""The sparse MoE dispatch (tokens to their top-k experts only) equals the dense reference."""

import pytest
import torch

from ufw.model import EarlyExitLM, ModelShape
from ufw.moe import dense_experts, sparse_experts


def _models(members: int, top_k: int, num_experts: int = 4):
    shape = ModelShape(13, dim=16, num_layers=2, num_heads=2, num_experts=num_experts,
                       experts_top_k=top_k)
    seeds = list(range(members))
    return EarlyExitLM(shape, seeds, "dense"), EarlyExitLM(shape, seeds, "sparse")


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_moe_equals_dense_in_outputs_and_gradients(members, top_k):
    dense, sparse = _models(members, top_k)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 13, (3, 20), generator=gen)  # [B, T]
    probe = torch.randn(members, 3, 20, 16, generator=gen)  # a loss that reads every output
    results = []
    for model in (dense, sparse):
        hidden, balance = model(tokens)
        loss = sum((h * probe).sum() for h in hidden) + balance.sum()
        loss.backward()
        results.append((hidden, balance, {n: p.grad for n, p in model.named_member_params()}))
    (h_dense, b_dense, g_dense), (h_sparse, b_sparse, g_sparse) = results
    for a, b in zip(h_dense, h_sparse):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_sparse, b_dense)
    assert g_dense.keys() == g_sparse.keys()
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-5,
                                   msg=f"gradient of {name}")
    assert g_sparse["1.router"].abs().sum() > 0  # the router learns through the gates


def test_sparse_experts_with_an_expert_no_token_chooses():
    """Gates that route nothing to expert 2 and everything else unevenly per member."""
    gen = torch.Generator().manual_seed(3)
    K, N, D, F_, E = 2, 9, 4, 8, 3
    x = torch.randn(K, N, D, generator=gen, requires_grad=True)
    chosen = torch.tensor([[0] * 7 + [1] * 2, [1] * 9])  # member 1 uses expert 1 only
    gates = torch.zeros(K, N, E).scatter(-1, chosen[..., None], 1.0)
    weights = [torch.randn(K, E, D, F_, generator=gen), torch.randn(K, E, D, F_, generator=gen),
               torch.randn(K, E, F_, D, generator=gen)]
    expected = dense_experts(x, gates, *weights)
    torch.testing.assert_close(sparse_experts(x, gates, 1, *weights), expected)


def test_dense_unless_sparse_is_asked_for():
    shape = ModelShape(13, dim=16, num_experts=8, experts_top_k=2)
    model = EarlyExitLM(shape, [0])
    assert not model.uses_sparse_moe()  # dense: faster wherever measured (ufw/moe.py)
    assert EarlyExitLM(shape, [0], "sparse").uses_sparse_moe()
    assert not EarlyExitLM(ModelShape(13, dim=16), [0], "sparse").uses_sparse_moe()
    with pytest.raises(ValueError, match="moe_dispatch"):
        EarlyExitLM(shape, [0], "fast")
