"""What only a CUDA machine can check (`make gpu-check`; every test here is skipped without CUDA): the
training step under bf16 autocast with fused AdamW, the SDPA kernels of both models, generation with the
static KV cache and continuous batching, rank scoring, all on the GPU against the same computation on the
CPU in fp32. Tiny random weights, so the whole file runs in well under a minute."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import data
import llama
import t5
import tinyllm
import student as students
import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
EXAMPLES = [data.Example("q1", "Which one is red, as a rule?", ("grass", "blood", "the sky"), 1),
            data.Example("q2", "Which is cold?", ("ice", "fire"), 0),
            data.Example("q3", "Which animal swims in the sea most of its life?", ("fish", "rock", "cat", "dog"), 0)]


def rows_of(student: students.Student) -> list[list[tuple[int, list[int], list[int]]]]:
    """Per example, an answer row and a long 'rationale' row: two tasks, targets of very different lengths."""
    return [[(0, student.fit_prompt(ex, "answer", "predict: ", 512), student.encode_target(ex.answer_text)),
             (1, student.fit_prompt(ex, "t", "explain: ", 512),
              student.encode_target(" ".join([ex.answer_text, "is the option that fits"] * 4)))]
            for ex in EXAMPLES]


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_bf16_training_step_with_fused_adamw(kind, request):
    """train.py's step on CUDA under bf16 autocast (fp32 master weights, fused AdamW): its Eq. 2 loss is the fp32
    CPU loss within bf16 rounding, the fused update equals the per-tensor one, and a few steps lower the loss."""
    folder = request.getfixturevalue(f"tiny_{kind}")
    cpu = students.load_student(str(folder), CPU, bf16=False)
    gpu = students.load_student(str(folder), CUDA, bf16=True)
    assert gpu.bf16, "bf16 autocast must be on for this GPU"
    micro = rows_of(cpu)
    weights = torch.tensor([1.0, 0.5])
    tokens = torch.tensor([sum(len(t) for rows in micro for task, _, t in rows if task == k) for k in (0, 1)],
                          dtype=torch.float)
    reference, _ = train.micro_batch_loss(cpu, micro, weights, tokens, world=1)
    loss, task_losses = train.micro_batch_loss(gpu, micro, weights.to(CUDA), tokens.to(CUDA), world=1)
    assert torch.isfinite(task_losses).all()
    assert abs(loss.item() - reference.item()) <= 0.03 * abs(reference.item())
    loss.backward()
    fused = torch.optim.AdamW(gpu.module.parameters(), lr=1e-3, fused=True)
    copy = [p.detach().clone().requires_grad_(True) for p in gpu.module.parameters()]
    for c, p in zip(copy, gpu.module.parameters()):
        c.grad = p.grad.clone()
    loop = torch.optim.AdamW(copy, lr=1e-3, foreach=False)
    fused.step(), loop.step()
    for c, p in zip(copy, gpu.module.parameters()):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-6)
    fused.zero_grad(set_to_none=True)
    first = loss.item()
    for _ in range(5):
        loss, _ = train.micro_batch_loss(gpu, micro, weights.to(CUDA), tokens.to(CUDA), world=1)
        loss.backward()
        fused.step()
        fused.zero_grad(set_to_none=True)
    assert loss.item() < first


def test_sdpa_forwards_on_cuda_match_the_cpu(tiny_llama, tiny_t5):
    """Both models through CUDA's SDPA kernels (causal, padded masks, GQA) in fp32 give the CPU's logits."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    for model_cls, folder in ((llama.Llama, tiny_llama), (t5.T5, tiny_t5)):
        cpu_model, gpu_model = model_cls.from_pretrained(folder), model_cls.from_pretrained(folder, device="cuda")
        with torch.no_grad():
            if model_cls is llama.Llama:
                expected, got = cpu_model(ids, mask), gpu_model(ids.cuda(), mask.cuda())
                expected, got = expected[mask.bool()], got[mask.cuda().bool()]
            else:
                right = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
                right_mask = (right != 0).long()
                decoder = t5.shift_right(torch.tensor([[3, 4, 5], [6, 7, 8]]))
                expected = cpu_model(right, right_mask, decoder)
                got = gpu_model(right.cuda(), right_mask.cuda(), decoder.cuda())
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generation_static_cache_and_continuous_batching_on_cuda(kind, tiny_llama, tiny_t5):
    """fp32 on CUDA: batched greedy generation (static KV cache) equals the CPU's, and continuous batching over
    3 rows equals each prompt decoded alone."""
    folder = tiny_llama if kind == "llama" else tiny_t5
    model_cls = llama.Llama if kind == "llama" else t5.T5
    cpu_model, gpu_model = model_cls.from_pretrained(folder), model_cls.from_pretrained(folder, device="cuda")
    generator = torch.Generator().manual_seed(0)
    prompts_ = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (5, 17, 9, 30, 2)]
    limits = [12, 3, 9, 7, 16]

    def alone(model: torch.nn.Module, prompt: list[int], limit: int, device: str) -> list[int]:
        ids = torch.tensor([prompt], device=device)
        if kind == "llama":
            return model.generate(ids, None, limit, eos_ids=[])[0].tolist()
        return model.generate(ids, torch.ones_like(ids), limit, eos_id=-1)[0].tolist()

    expected = [alone(cpu_model, p, n, "cpu") for p, n in zip(prompts_, limits)]
    assert [alone(gpu_model, p, n, "cuda") for p, n in zip(prompts_, limits)] == expected
    if kind == "llama":
        slots = llama.Slots(gpu_model, 3, max(len(p) + n for p, n in zip(prompts_, limits)), CUDA)
    else:
        slots = t5.Slots(gpu_model, 3, max(limits), max(len(p) for p in prompts_), CUDA)
    got = dict(tinyllm.continuous_generate(slots, prompts_, limits, set(), lambda logits: logits.argmax(-1)))
    assert [got[i] for i in range(len(prompts_))] == expected


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_rank_scoring_on_cuda(kind, request):
    folder: Path = request.getfixturevalue(f"tiny_{kind}")
    cpu = students.predict(students.load_student(str(folder), CPU, bf16=False), EXAMPLES, "rank")
    gpu = students.predict(students.load_student(str(folder), CUDA, bf16=False), EXAMPLES, "rank")
    for a, b in zip(cpu, gpu):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-4, abs=1e-4)
