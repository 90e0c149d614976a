"""Shape (fake) functions and autograd formulas of the compiled ops, shared by every backend that has them.

The C++/CUDA ops (``torch.ops.cbd_fast.*``) and the Triton ops (``cbd_fast._triton_ops``) have the same
signatures per family, so one registration function per family serves both:

* ``banzhaf_interaction`` + its ``_backward``: the fused backward recomputes every draw from the seed;
* ``banzhaf_interaction_from_tokens``: differentiated through the similarity — the family's backward gives dL/dS,
  and ``S = text · imageᵀ`` turns it into feature gradients with two batched GEMMs;
* ``maxsim_score`` + its ``_backward``: takes precomputed token coefficients, so its backward returns gradients for
  the features and the coefficients; the coefficients' own graph (softmax of the weight logits) is differentiated
  by autograd outside the op.

The fused backward ops have no derivative of their own: :func:`forbid_double_backward` makes differentiating them
(second derivatives: ``create_graph=True`` followed by another backward, gradgradcheck) a clear error instead of
the wrong result autograd otherwise gives with only a warning. First derivatives taken with ``create_graph=True``
still work.
"""
from __future__ import annotations

import torch

from ._checks import result_dtype
from ._result import empty_banzhaf_outputs


def _op(qualified_name: str):
    """torch.ops.cbd_fast.<name> for ``"cbd_fast::<name>"`` (looked up when called, after registration)."""
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def register_checked_fake(op_name: str):
    """``torch.library.register_fake(op_name)`` for a fake function that first refuses tensor arguments on more than
    one device. A fake function runs for every call with a meta tensor among its arguments, real tensors of another
    device included; the kernels refuse such a mixture, and without this check the call would return uninitialised
    tensors on a real device."""
    def decorator(fake):
        names = [argument.name for argument in _op(op_name).default._schema.arguments]

        def checked_fake(*args, **kwargs):
            values = {**dict(zip(names, args)), **kwargs}
            tensors = [(name, x) for name, x in values.items() if isinstance(x, torch.Tensor)]
            first_name, first = tensors[0]
            for name, x in tensors[1:]:
                if x.device != first.device:
                    raise RuntimeError(f"{op_name}: {name} must be on {first.device} ({first_name}'s device), got "
                                       f"one on {x.device}")
            return fake(*args, **kwargs)

        return torch.library.register_fake(op_name)(checked_fake)

    return decorator


def forbid_double_backward(backward_name: str, op_name: str) -> None:
    """Registers an autograd formula for ``backward_name``, the fused backward of ``op_name``, that raises when a
    second derivative reaches it. Without one, autograd treats the op's outputs as constants (it only warns), and
    second derivatives come out wrong."""

    def setup_context(ctx, inputs, output):
        pass  # nothing to save: the formula only raises

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op_name} has no second derivative: its backward is the fused kernel {backward_name}, which cannot be "
            "differentiated again (create_graph=True followed by another backward, gradgradcheck). Use "
            "backend='torch', which autograd differentiates to any order.")

    torch.library.register_autograd(backward_name, backward, setup_context=setup_context)


def register_banzhaf_op(op_name: str, backward_name: str) -> None:
    """Fake functions and autograd of ``op_name(sim, text_mask, image_mask, text_weight, image_weight, num_samples,
    seed, estimator) -> (interaction, text_value, image_value)`` and of its fused backward ``backward_name``."""

    @register_checked_fake(op_name)
    def _(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator):
        return empty_banzhaf_outputs(sim, *sim.shape, result_dtype(sim.dtype))

    @register_checked_fake(backward_name)
    def _(grad_interaction, grad_text_value, grad_image_value, sim, text_mask, image_mask, text_weight,
          image_weight, num_samples, seed, estimator):
        return torch.empty_like(sim), torch.empty_like(text_weight), torch.empty_like(image_weight)

    def setup_context(ctx, inputs, output):
        sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator = inputs
        ctx.save_for_backward(sim, text_mask, image_mask, text_weight, image_weight)
        ctx.config = (num_samples, seed, estimator)

    def backward(ctx, grad_interaction, grad_text_value, grad_image_value):
        sim, text_mask, image_mask, text_weight, image_weight = ctx.saved_tensors
        grads = [g if g is not None else torch.zeros(shape, dtype=sim.dtype, device=sim.device)
                 for g, shape in ((grad_interaction, sim.shape), (grad_text_value, text_mask.shape),
                                  (grad_image_value, image_mask.shape))]
        grad_sim, grad_text_weight, grad_image_weight = _op(backward_name)(
            *(g.contiguous() for g in grads), sim, text_mask, image_mask, text_weight, image_weight, *ctx.config)
        return grad_sim, None, None, grad_text_weight, grad_image_weight, None, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    forbid_double_backward(backward_name, op_name)


def register_from_tokens_op(op_name: str, sim_backward_name: str) -> None:
    """Fake function and autograd of ``op_name(text, image, text_mask, image_mask, text_weight, image_weight,
    num_samples, seed, estimator)``; ``sim_backward_name`` is the family's ``banzhaf_interaction_backward``."""

    @register_checked_fake(op_name)
    def _(text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator):
        return empty_banzhaf_outputs(text, text.shape[0], text.shape[1], image.shape[1], result_dtype(text.dtype))

    def setup_context(ctx, inputs, output):
        text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator = inputs
        ctx.save_for_backward(text, image, text_mask, image_mask, text_weight, image_weight)
        ctx.config = (num_samples, seed, estimator)

    def backward(ctx, grad_interaction, grad_text_value, grad_image_value):
        text, image, text_mask, image_mask, text_weight, image_weight = ctx.saved_tensors
        dtype = result_dtype(text.dtype)
        text_f, image_f = text.to(dtype), image.to(dtype)
        # The forward kernel accumulated S in fp32 (fp64 for fp64 features); the backward uses the same S.
        sim = torch.bmm(text_f, image_f.transpose(1, 2))
        grad_sim, grad_text_weight, grad_image_weight = _op(sim_backward_name)(
            grad_interaction.contiguous(), grad_text_value.contiguous(), grad_image_value.contiguous(), sim,
            text_mask, image_mask, text_weight, image_weight, *ctx.config)
        grad_sim = grad_sim.to(dtype)
        grad_text = torch.bmm(grad_sim, image_f).to(text.dtype)
        grad_image = torch.bmm(grad_sim.transpose(1, 2), text_f).to(image.dtype)
        return grad_text, grad_image, None, None, grad_text_weight, grad_image_weight, None, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def register_maxsim_score_op(op_name: str, backward_name: str) -> None:
    """Fake functions and autograd of ``op_name(text, image, text_mask, image_mask, alpha, beta) -> score`` and of
    ``backward_name(grad, text, image, text_mask, image_mask, alpha, beta) -> (grad_text, grad_image, grad_alpha,
    grad_beta)``."""

    @register_checked_fake(op_name)
    def _(text, image, text_mask, image_mask, alpha, beta):
        return text.new_empty((text.shape[0], image.shape[0]), dtype=result_dtype(text.dtype))

    @register_checked_fake(backward_name)
    def _(grad_score, text, image, text_mask, image_mask, alpha, beta):
        dtype = result_dtype(text.dtype)
        return (torch.empty_like(text, dtype=dtype), torch.empty_like(image, dtype=dtype), torch.empty_like(alpha),
                torch.empty_like(beta))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_score):
        text, image, text_mask, image_mask, alpha, beta = ctx.saved_tensors
        grad_text, grad_image, grad_alpha, grad_beta = _op(backward_name)(
            grad_score.contiguous(), text, image, text_mask, image_mask, alpha, beta)
        return grad_text.to(text.dtype), grad_image.to(image.dtype), None, None, grad_alpha, grad_beta

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    forbid_double_backward(backward_name, op_name)
