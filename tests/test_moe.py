"""The sparse MoE dispatch (tokens to their top-k experts only) equals the dense reference."""

import pytest
import torch

from ufw.config import preset
from ufw.data import make_corpus, python_docs_text
from ufw.model import EarlyExitLM, ModelShape
from ufw.moe import dense_experts, sparse_experts
from ufw.train import Population


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
    for name in g_dense:  # fp32 sums in another order: relative to the gradient's scale
        if g_dense[name] is None:  # a parameter this loss does not use
            assert g_sparse[name] is None
            continue
        scale = g_dense[name].abs().max()
        torch.testing.assert_close(g_sparse[name] / scale, g_dense[name] / scale, rtol=1e-4,
                                   atol=1e-6, msg=f"gradient of {name}")
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
    assert not model.uses_sparse_moe()  # the reference; Population picks (next test)
    assert EarlyExitLM(shape, [0], "sparse").uses_sparse_moe()
    assert not EarlyExitLM(ModelShape(13, dim=16), [0], "sparse").uses_sparse_moe()
    with pytest.raises(ValueError, match="moe_dispatch"):
        EarlyExitLM(shape, [0], "fast")


def test_population_routes_sparse_only_where_a_cuda_graph_can_capture_it():
    """Sparse dispatch by default only in bf16 on a GPU, with rows of whole 16-byte units:
    there it is grouped kernels without a host sync. Here (a CPU) the default is dense."""
    from ufw.moe import runs_grouped_kernel

    assert runs_grouped_kernel(torch.bfloat16, 64, 256)
    assert not runs_grouped_kernel(torch.float32, 64, 256)  # fp32: the loop over groups
    assert not runs_grouped_kernel(torch.bfloat16, 12, 48)  # rows of 24 bytes
    text = python_docs_text()
    corpus = make_corpus("s", text[:3000], text[-1000:], batch_size=4, seq_len=16)
    config = preset("standard_llm").with_overrides(
        {"dim": 16, "num_heads": 2, "batch_size": 4, "seq_len": 16, "num_experts": 4})
    for precision in ("fp32", "bf16"):
        assert Population([config], corpus, precision=precision).model.moe_dispatch == "dense"
    assert Population([config], corpus, moe_dispatch="sparse").model.uses_sparse_moe()


def test_grouped_products_kernel_equals_the_fp32_loop():
    """bf16 takes the one-kernel path; it must equal the loop over groups (fp32) on the same
    values, empty groups included."""
    from ufw.moe import grouped_products

    gen = torch.Generator().manual_seed(5)
    ends = torch.tensor([16, 16, 48, 80, 80])  # groups 1 and 4 are empty
    rows = torch.randn(80, 8, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(5, 8, 16, generator=gen).bfloat16().requires_grad_()
    rows32, w32 = (t.detach().float().requires_grad_() for t in (rows, w))
    probe = torch.randn(80, 16, generator=gen)
    kernel, loop = grouped_products(rows, w, ends), grouped_products(rows32, w32, ends)
    assert kernel.dtype == torch.bfloat16 and loop.dtype == torch.float32
    torch.testing.assert_close(kernel.float(), loop, rtol=2e-2, atol=2e-2)
    (kernel.float() * probe).sum().backward()
    (loop * probe).sum().backward()
    torch.testing.assert_close(rows.grad.float(), rows32.grad, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=2e-2, atol=5e-2)
    assert (w.grad[1] == 0).all() and (w.grad[4] == 0).all()  # empty groups learn nothing


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_experts_under_bf16_autocast_match_the_fp32_reference(top_k):
    """Under bf16 autocast the sparse path runs its grouped kernel: its outputs and gradients
    equal dense fp32 experts to bf16 precision, with the same gates (routing is tested above;
    in a whole model bf16 rounding can flip a near-tie route, so that is not compared)."""
    gen = torch.Generator().manual_seed(11)
    K, N, D, F_, E = 3, 40, 16, 32, 4
    x = torch.randn(K, N, D, generator=gen, requires_grad=True)
    logits = torch.randn(K, N, E, generator=gen, requires_grad=True)
    weights = [(torch.randn(K, E, *s, generator=gen) / 4).requires_grad_()
               for s in ((D, F_), (D, F_), (F_, D))]
    probe = torch.randn(K, N, D, generator=gen)
    results = []
    for use_sparse in (True, False):
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(top_k, -1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)  # any gates 0 off the top-k
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_sparse):
            out = (sparse_experts(x, gates, top_k, *weights) if use_sparse
                   else dense_experts(x, gates, *weights))
        (out.float() * probe).sum().backward()
        results.append([out.float()] + [t.grad.clone() for t in (x, logits, *weights)])
        for t in (x, logits, *weights):
            t.grad = None
    for name, got, want in zip(["out", "x", "logits", "w_gate", "w_up", "w_down"], *results):
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-2, msg=name)


def test_top_1_router_learns_from_the_task_loss():
    """With one expert per token the gate is its router probability (Switch), not p / p = 1:
    the router's gradient from the task loss is of the experts' order, not rounding noise."""
    shape = ModelShape(13, dim=16, num_layers=1, num_heads=2, num_experts=4, experts_top_k=1)
    model = EarlyExitLM(shape, [0])
    tokens = torch.randint(0, 13, (4, 16), generator=torch.Generator().manual_seed(0))
    gates, _ = model.expert_gates(model.p("embed")[:, tokens].reshape(1, 64, 16), 1)
    probs = torch.softmax(model.p("embed")[:, tokens].reshape(1, 64, 16)
                          @ model.p("1.router"), -1)
    torch.testing.assert_close(gates.amax(-1), probs.amax(-1))  # the gate is p itself
    hidden, _ = model(tokens)  # the task loss only, no balance loss
    hidden[-1].square().mean().backward()
    router, expert = model.p("1.router").grad.abs().max(), model.p("1.w_up").grad.abs().max()
    assert router > 1e-3 * expert
