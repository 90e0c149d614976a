"""A small workload that calls every GPU kernel once (forward and backward), for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python -I tests/gpu_sanitizer_workload.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python -I tests/gpu_sanitizer_workload.py

Sizes are chosen to hit the edges: padding tokens, a pair without valid image tokens, T and V that are not
multiples of any block size, and the largest supported T and V.
"""
import sys

import torch

import cbd_fast


def banzhaf_workload(backend: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, text_len, image_len in ((3, 5, 9), (2, 33, 50), (1, 256, 576)):
        sim = torch.randn(batch, text_len, image_len, device="cuda", generator=gen, requires_grad=True)
        text_mask = torch.rand(batch, text_len, device="cuda", generator=gen) < 0.8
        image_mask = torch.rand(batch, image_len, device="cuda", generator=gen) < 0.8
        image_mask[0] = False
        weights = [torch.randn(batch, n, device="cuda", generator=gen, requires_grad=True)
                   for n in (text_len, image_len)]
        for estimator in ("paired", "msr"):
            out = cbd_fast.banzhaf_interaction(sim, text_mask, image_mask, *weights, num_samples=8, seed=1,
                                               estimator=estimator, backend=backend)
            sum(x.sum() for x in out).backward()
        text = torch.randn(batch, text_len, 64, device="cuda", generator=gen, dtype=torch.bfloat16,
                           requires_grad=True)
        image = torch.randn(batch, image_len, 64, device="cuda", generator=gen, dtype=torch.bfloat16,
                            requires_grad=True)
        out = cbd_fast.banzhaf_interaction_from_tokens(text, image, text_mask, image_mask, num_samples=8,
                                                       backend=backend)
        sum(x.sum() for x in out).backward()


def maxsim_workload(backend: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    for num_texts, num_images, text_len, image_len, dim in ((3, 5, 7, 9, 24), (17, 19, 32, 50, 512),
                                                             (2, 2, 256, 576, 1024)):
        for dtype in (torch.float32, torch.bfloat16):
            text = torch.randn(num_texts, text_len, dim, device="cuda", generator=gen).to(dtype).requires_grad_()
            image = torch.randn(num_images, image_len, dim, device="cuda", generator=gen).to(dtype).requires_grad_()
            text_mask = torch.rand(num_texts, text_len, device="cuda", generator=gen) < 0.8
            image_mask = torch.rand(num_images, image_len, device="cuda", generator=gen) < 0.8
            text_mask[0] = False
            score = cbd_fast.maxsim(text, image, text_mask, image_mask, backend=backend)
            score.sum().backward()


def main() -> int:
    info = cbd_fast.build_info()
    backends = [b for b in ("cuda", "triton") if info[b]]
    for backend in backends:
        banzhaf_workload(backend)
        maxsim_workload(backend)
    torch.cuda.synchronize()
    print(f"sanitizer workload done: {backends}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
