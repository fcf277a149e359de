"""--compile: the compiled training forward and the compiled one-token decode step equal eager, on tiny random
weights, one shape each (a compile costs seconds to minutes on a CPU; CI runs these two only)."""
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama  # noqa: E402
import t5  # noqa: E402
import tinyllm  # noqa: E402
import student as students  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile's CPU backend needs a C++ compiler (g++), absent here")
# make gpu-check runs them on CUDA too (Triton kernels; the decode step as CUDA graphs)
DEVICES = ["cpu"] + (["cuda"] * torch.cuda.is_available())


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_t5_step_equals_eager(device):
    """train.py's T5 step (packed rows) with --compile=1: the same losses and gradients as eager (fp32)."""
    torch.manual_seed(0)
    config = t5.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = t5.T5(config).to(device).eval()  # no dropout: both runs see the same function
    student = students.Seq2SeqStudent(model, SimpleNamespace(pad_id=0), torch.device(device), bf16=False)
    lengths = [(20, 3), (17, 25), (23, 4), (12, 9), (19, 30)]  # answers beside rationales, two and more per bin
    rows = [([int(x) for x in torch.randint(2, 96, (p,))], [int(x) for x in torch.randint(2, 96, (t,))])
            for p, t in lengths]
    weights = torch.rand(len(rows), device=device)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, _, _ = student.target_loss([rows[:2], rows[2:]], weights)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager_grads = step()
    compiled = students.compile_objective(student)
    compiled_loss, compiled_grads = step()
    assert compiled.graphs >= 1 and compiled.seconds > 0  # it did compile (a broken swap would run eager)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_step_equals_eager(device, kind):
    """Continuous batching with the compiled one-token step (tinyllm.compile_slots: cache widths rounded up to
    64 slots): the same greedy tokens and logits as the eager step that reads each row's exact prefix; a
    second Slots of the same shapes (a new `make rationales` call) compiles nothing new."""
    torch.manual_seed(0)
    if kind == "llama":
        config = llama.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = llama.Llama(config).to(device).eval()
    else:
        config = t5.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        model = t5.T5(config).to(device).eval()
    prompts = [[int(x) for x in torch.randint(3, 96, (n,))] for n in (9, 14, 5)]
    limits = [6, 6, 6]  # all rows end together: no row is dropped, so one shape

    def run(compile: bool) -> tuple[dict, list[torch.Tensor], llama.Compiled | None]:
        # room for 80 tokens: the compiled step reads 64 slots where the eager one reads a few
        if kind == "llama":
            slots = llama.Slots(model, 3, 96, torch.device(device))
        else:
            slots = t5.Slots(model, 3, 80, max(len(p) for p in prompts), torch.device(device))
        compiled = tinyllm.compile_slots(slots) if compile else None
        seen = []

        def greedy(logits: torch.Tensor) -> torch.Tensor:
            seen.append(logits.clone())  # a CUDA graph's output is overwritten by its next replay
            return logits.argmax(-1)

        with torch.inference_mode():
            return dict(tinyllm.continuous_generate(slots, prompts, limits, set(), greedy)), seen, compiled

    eager, eager_logits, _ = run(False)
    compiled, compiled_logits, first = run(True)
    assert first.graphs >= 1
    assert compiled == eager
    for a, b in zip(compiled_logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    again, _, second = run(True)
    assert again == eager and second.graphs == 0
