"""``dime``: Dynamic Modality Interaction Modeling (Qu et al., SIGIR 2021) on the dual encoder's tokens, trained
continually with LwF on the dual-encoder scores and used to re-rank the dual encoder's top-k (PEERS §5.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..model import TokenFeatures
from .base import Method, global_sample_distillation, same_sample

CELLS = 4  # RIC, IMRC, GLGC, CMRC
SKIP_BELOW = 1e-4  # a next-layer cell whose incoming path weights all sum below this gets the skip path


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x[P,N,D]`` over the valid tokens ``mask[P,N]``: ``[P,D]``."""
    weight = mask.to(x.dtype).unsqueeze(-1)
    return (x * weight).sum(1) / weight.sum(1).clamp_min(1)


class Router(nn.Module):
    """Path weights of a cell: an MLP on the mean-pooled cell input, ``relu(tanh(·))`` in [0, 1); the output bias
    starts at 1.5 so every path starts open. ``x[P,N,D]``, ``mask[P,N]`` -> ``[P, paths]``."""

    def __init__(self, dim: int, paths: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, max(1, dim // 2)), nn.ReLU(), nn.Linear(max(1, dim // 2), paths))
        nn.init.constant_(self.net[-1].bias, 1.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.tanh(self.net(masked_mean(x, mask))))


class RectifiedIdentity(nn.Module):
    """RIC: ``relu(x)``."""

    def forward(self, x, mask, other_global, context, context_mask):
        return torch.relu(x)


class IntraModalReasoning(nn.Module):
    """IMRC: residual multi-head self-attention over the valid tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, mask, other_global, context, context_mask):
        return x + self.attention(x, x, x, key_padding_mask=~mask, need_weights=False)[0]


class GlobalLocalGuidance(nn.Module):
    """GLGC: ``(1 + normalize(W l ⊙ g)) ⊙ l`` with ``g`` the other modality's global vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x, mask, other_global, context, context_mask):
        return (1 + F.normalize(self.linear(x) * other_global.unsqueeze(1), dim=-1)) * x


class CrossModalRefinement(nn.Module):
    """CMRC: SCAN-style cross-attention to the other modality's tokens (similarities clipped at 0, L2-normalised
    over the query tokens, softmax at temperature ``λ`` over the valid context tokens), then the gated refinement
    ``q + W₂ relu(W₁(q ⊙ tanh(W_s c) + W_b c))``."""

    def __init__(self, dim: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.scale, self.shift = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, mask, other_global, context, context_mask):
        sim = torch.relu(x @ context.transpose(1, 2)) * mask.unsqueeze(-1)  # [P, N, M]
        sim = sim / sim.norm(dim=1, keepdim=True).clamp_min(1e-8)
        attention = torch.softmax((self.temperature * sim).masked_fill(~context_mask.unsqueeze(1), float("-inf")),
                                  dim=-1)
        attended = attention @ context
        return x + self.fc2(torch.relu(self.fc1(x * torch.tanh(self.scale(attended)) + self.shift(attended))))


class RoutedInteraction(nn.Module):
    """One of DIME's two models: ``layers`` routing layers of the four cells refine the local features of one
    modality given the other, then ``BN → mean-pool + max-pool → L2`` and the cosine with the other modality's
    global vector.

    In layer ``l`` every cell reads its own input (layer 0: all read the local features), and its router sends its
    output to each cell of layer ``l + 1`` (to one output after the last layer) with a weight in [0, 1); a cell's
    next input is the weighted mean of the outputs sent to it (the mean of the layer's inputs when its weights sum
    below 1e-4: the skip path).

    forward(local[P,N,D], local_mask[P,N], other_global[P,D], context[P,M,D], context_mask[P,M]) ->
    (score[P], paths[P, num_paths]) with every router output concatenated in ``paths``.
    """

    def __init__(self, dim: int, layers: int, heads: int, temperature: float):
        super().__init__()
        self.cells = nn.ModuleList(nn.ModuleList([RectifiedIdentity(), IntraModalReasoning(dim, heads),
                                                  GlobalLocalGuidance(dim), CrossModalRefinement(dim, temperature)])
                                   for _ in range(layers))
        self.routers = nn.ModuleList(nn.ModuleList(Router(dim, CELLS if layer + 1 < layers else 1)
                                                   for _ in range(CELLS)) for layer in range(layers))
        self.norm = nn.BatchNorm1d(dim)
        self.num_paths = CELLS * CELLS * (layers - 1) + CELLS

    def forward(self, local, local_mask, other_global, context, context_mask):
        inputs = [local] * CELLS
        paths = []
        for cells, routers in zip(self.cells, self.routers):
            outputs = [cell(x, local_mask, other_global, context, context_mask) for cell, x in zip(cells, inputs)]
            weights = torch.stack([router(x, local_mask) for router, x in zip(routers, inputs)], 1)  # [P, 4, out]
            paths.append(weights.flatten(1))
            stacked = torch.stack(outputs, 1)  # [P, 4, N, D]
            total = weights.sum(1)  # [P, out]
            mixed = torch.einsum("pco,pcnd->pond", weights, stacked) / total.clamp_min(SKIP_BELOW)[..., None, None]
            skip = torch.stack(inputs, 1).mean(1, keepdim=True)
            inputs = list(torch.where((total < SKIP_BELOW)[..., None, None], skip, mixed).unbind(1))
        refined = inputs[0]
        normed = torch.zeros_like(refined)
        normed[local_mask] = self.norm(refined[local_mask])
        pooled = masked_mean(normed, local_mask) + normed.masked_fill(~local_mask.unsqueeze(-1), float("-inf")).amax(1)
        score = (F.normalize(pooled, dim=-1) * F.normalize(other_global, dim=-1)).sum(-1)
        return score, torch.cat(paths, 1)


def gram_mismatch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖a aᵀ − b bᵀ‖²_F / N`` for ``a[N,D1]``, ``b[N,D2]``: DIME's path regularisation."""
    return (a @ a.t() - b @ b.t()).square().sum() / a.shape[0]


def candidate_pairs(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    """The ``k`` best columns of every row and ``k`` best rows of every column of ``scores[Q,G]``, leaving out
    ``exclude[Q,G]`` entries. Returns ``(row_pick[Q,k'], row_ok[Q,k'], col_pick[G,k''], col_ok[G,k''])``: indices
    and whether each pick is a real candidate (False where a row had fewer than k allowed entries)."""
    masked = scores if exclude is None else scores.masked_fill(exclude, float("-inf"))
    row_values, row_pick = masked.topk(min(k, scores.shape[1]), dim=1)
    col_values, col_pick = masked.t().topk(min(k, scores.shape[0]), dim=1)
    return row_pick, row_values > float("-inf"), col_pick, col_values > float("-inf")


class DIME(Method):
    """DIME ported to the continual dual encoder (PEERS §5.3, option b "DIME + LwF").

    Two routed interaction models (:class:`RoutedInteraction`) read the backbone's token features: image→text
    refines the image tokens given the caption (cross-attention temperature ``i2t_temperature``) and compares them
    with the caption's pooled feature; text→image refines the caption tokens given the image
    (``t2i_temperature``); the DIME score of a pair is the mean of the two (DIME's ensemble). Loss on the current
    (and replay) batch: the dual encoder's InfoNCE (it proposes the candidates), ``rank`` · VSE++ hinge with the
    hardest negative (margin ``margin``) on DIME scores, ``path`` · DIME's path regularisation (the Gram matrix of
    the matched pairs' projected routing weights should match the Gram matrix of their captions' mean token
    features), and ``lwf`` · the KL between the previous-task model's and the current model's dual-encoder score
    rows (temperature ``lwf_temperature``).

    Bounded cost: DIME scores every pair it ranks, so training scores each matched pair and, per caption and per
    image, the ``train_negatives`` hardest negatives by dual-encoder score (the hinge's hardest negative is taken
    among those); evaluation (:meth:`rescore`) re-ranks, for every caption its ``rerank_top_k`` best images and for
    every image its ``rerank_top_k`` best captions by dual-encoder score: those candidates are ordered by DIME score
    above all other pairs, which keep their dual-encoder order. At most (Q + G)·k module calls per gallery;
    ``rerank_top_k: 0`` evaluates the dual encoder alone (to separate the re-ranker's effect from the backbone's).

    Preserves: through LwF, the previous model's ranking of the batch (the first stage); the interaction module
    itself is fine-tuned sequentially.

    Defaults: ``rank: 1.0``, ``margin: 0.2``, ``path: 0.5``, ``lwf: 1.0``, ``lwf_temperature: 0.05``,
    ``layers: 3``, ``heads: 4``, ``i2t_temperature: 4.0``, ``t2i_temperature: 9.0``, ``train_negatives: 4``,
    ``rerank_top_k: 16``, ``rerank_chunk: 256`` (pairs per module call in evaluation), ``prompt: 0.1``.
    Combines with replay.

    Substitutions (the port's, stated in the README): the backbone's image tokens (CLS + patches) and caption tokens
    replace the BUTD region features and the frozen BERT + n-gram word features, and its pooled features replace
    the global embeddings; the path regulariser's sentence embedding is the detached mean of the caption's token
    features instead of a mean BERT state; the hinge is averaged over rows (the public code sums) and its hardest
    negative is sought among the dual encoder's top candidates; IMRC uses ``heads`` heads of width D/heads; the
    score is re-ranking of the dual encoder's top-k instead of exhaustive.

    Distributed training: global — the contrastive and LwF terms; local — the hinge, its candidates and the path
    term, on each rank's share of the batch (the public code trains on one GPU); a share of one row has no
    negatives and adds them as zeros.
    """

    name = "dime"
    sweep_weights = ("lwf",)
    defaults = dict(Method.defaults, rank=1.0, margin=0.2, path=0.5, lwf=1.0, lwf_temperature=0.05, layers=3,
                    heads=4, i2t_temperature=4.0, t2i_temperature=9.0, train_negatives=4, rerank_top_k=16,
                    rerank_chunk=256)
    positive = ("lwf_temperature", "layers", "heads", "i2t_temperature", "t2i_temperature", "train_negatives",
                "rerank_chunk")

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        dim = trainer.model.config["embed_dim"]
        if dim % self.args["heads"]:
            raise ConfigError(f"method_args.heads (method 'dime') must divide the embedding size {dim}, "
                             f"got {self.args['heads']}")
        layers, heads = self.args["layers"], self.args["heads"]
        self.image_to_text = RoutedInteraction(dim, layers, heads, self.args["i2t_temperature"])
        self.text_to_image = RoutedInteraction(dim, layers, heads, self.args["t2i_temperature"])
        self.path_projection = nn.ModuleList(nn.Linear(self.image_to_text.num_paths, dim) for _ in range(2))

    def pair_scores(self, text: TokenFeatures, image: TokenFeatures, text_rows: torch.Tensor,
                    image_rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """DIME scores of the pairs ``(text_rows[p], image_rows[p])``: ``([P], [paths_i2t[P,n], paths_t2i[P,n]])``."""
        # index_select, not x[rows]: the rows repeat, and the backward of advanced indexing (an accumulating
        # index_put) sums repeated rows in a thread-dependent order on the CPU, index_select's does not
        t = TokenFeatures(*(x.index_select(0, text_rows) for x in text))
        i = TokenFeatures(*(x.index_select(0, image_rows) for x in image))
        t, i = (TokenFeatures(*(x.float() if x.is_floating_point() else x for x in f)) for f in (t, i))
        i2t, paths_i2t = self.image_to_text(i.tokens, i.mask, t.pooled, t.tokens, t.mask)
        t2i, paths_t2i = self.text_to_image(t.tokens, t.mask, i.pooled, i.tokens, i.mask)
        return 0.5 * (i2t + t2i), [paths_i2t, paths_t2i]

    def loss_terms(self, student, batch, task_index, step_seed):
        args = self.args
        terms = super().loss_terms(student, batch, task_index, step_seed)
        size = student.scores.shape[0]
        same = same_sample(batch)
        if (args["rank"] or args["path"]) and size > 1:
            row_pick, row_ok, col_pick, col_ok = candidate_pairs(student.scores.detach(), args["train_negatives"],
                                                                 same)
            arange = torch.arange(size, device=same.device)
            k_row, k_col = row_pick.shape[1], col_pick.shape[1]
            text_rows = torch.cat([arange, arange.repeat_interleave(k_row), col_pick.flatten()])
            image_rows = torch.cat([arange, row_pick.flatten(), arange.repeat_interleave(k_col)])
            scores, paths = self.pair_scores(student.text, student.image, text_rows, image_rows)
            positive = scores[:size]
            if args["rank"]:
                hardest_image = scores[size:size + size * k_row].view(size, k_row).masked_fill(~row_ok, float("-inf"))
                hardest_text = scores[size + size * k_row:].view(size, k_col).masked_fill(~col_ok, float("-inf"))
                hinge = (torch.relu(args["margin"] - positive + hardest_image.amax(1)).mean()
                         + torch.relu(args["margin"] - positive + hardest_text.amax(1)).mean())
                terms.add("rank", hinge, args["rank"])
            if args["path"]:
                semantic = F.normalize(masked_mean(student.text.tokens.float(), student.text.mask).detach(), dim=-1)
                path = [gram_mismatch(F.normalize(projection(direction[:size]), dim=-1), semantic)
                        for projection, direction in zip(self.path_projection, paths)]
                terms.add("path", 0.5 * (path[0] + path[1]), args["path"])
        else:  # one row, no negatives: zeros, so that every rank of a distributed run has the same terms
            for name in ("rank", "path"):
                if args[name]:
                    terms.add(name, student.scores.new_zeros((), dtype=torch.float32), args[name])
        if args["lwf"]:
            teacher = self.teacher(batch)
            if teacher is not None:
                terms.add("lwf", global_sample_distillation(student, teacher, args["lwf_temperature"]), args["lwf"])
        return terms

    @torch.no_grad()
    def rescore(self, text: TokenFeatures, image: TokenFeatures, scores: torch.Tensor) -> torch.Tensor:
        """Re-rank the dual encoder's candidates with DIME (see the class docstring). ``scores[Q,G]`` -> ``[Q,G]``."""
        if not self.args["rerank_top_k"]:
            return scores
        self.eval()
        row_pick, _, col_pick, _ = candidate_pairs(scores, self.args["rerank_top_k"])
        candidate = torch.zeros_like(scores, dtype=torch.bool)
        candidate.scatter_(1, row_pick, True)
        candidate.t().scatter_(1, col_pick, True)
        text_rows, image_rows = candidate.nonzero(as_tuple=True)
        chunk = self.args["rerank_chunk"]
        dime = torch.cat([self.pair_scores(text, image, text_rows[s:s + chunk], image_rows[s:s + chunk])[0]
                          for s in range(0, len(text_rows), chunk)])
        out = scores.float().clone()
        # candidates above every other pair, in DIME's order; the rest keep the dual encoder's order
        out[text_rows, image_rows] = dime - dime.min() + out.max() + 1.0
        return out
