"""Dual encoder of CBD: image and text towers with token outputs, WTI weight heads and prompt pools."""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import resolve_model_config
from .image import ImageTower
from .prompts import PromptPool
from .text import TextTower
from .tokenizer import ClipTokenizer

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


class TokenFeatures(NamedTuple):
    """Token-level output of one tower for a batch of ``B`` items.

    tokens: ``[B, N, D]`` L2-normalised along ``D`` on valid tokens, zero on padding.
    mask: ``[B, N]`` bool, True = valid token (player of the game; see DESIGN §2).
    weight: ``[B, N]`` WTI token-weight logits (0 on padding; zeros = uniform weights).
    pooled: ``[B, D]`` L2-normalised global feature (image: CLS token, text: end token).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor
    pooled: torch.Tensor

    def without_trailing_padding(self) -> "TokenFeatures":
        """The features over the token positions up to the last one valid in any row (at least 1): the positions
        beyond are padding in every row, which enters no score and is no player of a game."""
        valid = self.mask.any(0).nonzero()
        length = int(valid.max()) + 1 if valid.numel() else 1
        return self._replace(tokens=self.tokens[:, :length], mask=self.mask[:, :length],
                             weight=self.weight[:, :length])


class DualEncoderOutput(NamedTuple):
    """Result of :meth:`DualEncoder.forward`."""

    image: TokenFeatures
    text: TokenFeatures
    pull_loss: torch.Tensor  # scalar, mean query-key cosine of the selected prompts (0 without prompts)
    image_prompt_index: Optional[torch.Tensor]  # [B] or None
    text_prompt_index: Optional[torch.Tensor]  # [B] or None


class TokenWeightHead(nn.Module):
    """WTI weight logits: ``Linear(D, hidden) -> ReLU -> Linear(hidden, 1)`` per token, bounded to
    ``(-LOGIT_BOUND, LOGIT_BOUND)`` by a scaled tanh.

    The last layer starts at zero, so training starts from uniform token weights (mean pooling). The bound keeps
    weight ratios within e^20: unbounded logits drift apart during training (spans of ~40 were seen), which makes a
    few tokens carry all the weight and the Banzhaf estimator's leave-one-out sums lose precision.
    """

    LOGIT_BOUND = 10.0

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N]``."""
        logits = self.fc2(self.act(self.fc1(tokens))).squeeze(-1)
        return self.LOGIT_BOUND * torch.tanh(logits / self.LOGIT_BOUND)


class DualEncoder(nn.Module):
    """CLIP-style dual encoder returning token features for fine-grained (MaxSim/WTI) scores.

    Build with :func:`cbd_fast.model.create_model` (which also loads ``pretrained`` weights); the constructor
    only builds the architecture described by ``cfg`` (a partial or full config dict, see
    :mod:`cbd_fast.model.config`) and never reads a checkpoint.

    Submodules: ``visual`` (:class:`ImageTower`), ``text`` (:class:`TextTower`), ``image_weight_head`` and
    ``text_weight_head`` (:class:`TokenWeightHead`), ``image_prompts`` and ``text_prompts``
    (:class:`PromptPool`, or None when prompts are disabled); parameter ``logit_scale``.
    """

    def __init__(self, cfg: Optional[Mapping[str, Any]] = None):
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.config = cfg
        dim = cfg["embed_dim"]
        image_cfg, text_cfg, prompt_cfg = cfg["image"], cfg["text"], cfg["prompts"]
        self.visual = ImageTower(
            img_size=image_cfg["img_size"], patch_size=image_cfg["patch_size"], width=image_cfg["width"],
            depth=image_cfg["depth"], heads=image_cfg["heads"], embed_dim=dim, mlp_ratio=image_cfg["mlp_ratio"],
            act=image_cfg["act"], pre_norm=image_cfg["pre_norm"])
        self.text = TextTower(
            context_length=text_cfg["context_length"], width=text_cfg["width"], depth=text_cfg["depth"],
            heads=text_cfg["heads"], embed_dim=dim, mlp_ratio=text_cfg["mlp_ratio"], act=text_cfg["act"])
        hidden = cfg["weight_head_hidden"] or dim
        self.image_weight_head = TokenWeightHead(dim, hidden)
        self.text_weight_head = TokenWeightHead(dim, hidden)
        if prompt_cfg["enabled"]:
            # Keys live in the joint space: the queries are the towers' pooled, prompt-free features.
            self.image_prompts: Optional[PromptPool] = PromptPool(
                prompt_cfg["pool_size"], prompt_cfg["length"], image_cfg["width"], dim)
            self.text_prompts: Optional[PromptPool] = PromptPool(
                prompt_cfg["pool_size"], prompt_cfg["length"], text_cfg["width"], dim)
        else:
            self.image_prompts = None
            self.text_prompts = None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg["init_temperature"])))
        self._tokenizer: Optional[ClipTokenizer] = None
        self.load_report = None  # ClipLoadReport when create_model loaded a checkpoint

    # ----------------------------------------------------------------------------------------- inputs
    @property
    def tokenizer(self) -> ClipTokenizer:
        """CLIP tokenizer with this model's context length (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer(self.text.context_length)
        return self._tokenizer

    def tokenize(self, texts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids LongTensor[B, L], mask BoolTensor[B, L])`` on CPU, ``L`` = ``text.context_length``."""
        return self.tokenizer(texts)

    @property
    def image_size(self) -> int:
        return self.config["image"]["img_size"]

    def scale(self) -> torch.Tensor:
        """``exp(min(logit_scale, log 100))``: the multiplier of scores in the contrastive loss."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    # --------------------------------------------------------------------------------------- encoders
    @staticmethod
    def _pool_prompts(pool: Optional[PromptPool], index: Optional[torch.Tensor], tower: str) -> Optional[torch.Tensor]:
        if index is None:
            return None
        if pool is None:
            raise ValueError(f"{tower} prompt_index given but prompts are disabled in the model config")
        return pool(index)

    def encode_image(self, images: torch.Tensor, prompt_index: Optional[torch.Tensor] = None) -> TokenFeatures:
        """Image tokens: ``images[B, 3, H, W]`` -> TokenFeatures with ``N = 1 + num_patches`` (CLS first).

        ``prompt_index[B]`` selects image prompts per sample; prompt tokens never appear in the output.
        """
        prompts = self._pool_prompts(self.image_prompts, prompt_index, "image")
        tokens = self.visual(images, prompts)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        weight = self.image_weight_head(tokens)
        pooled = F.normalize(tokens[:, 0], dim=-1)
        return TokenFeatures(F.normalize(tokens, dim=-1), mask, weight, pooled)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor,
                    prompt_index: Optional[torch.Tensor] = None) -> TokenFeatures:
        """Text tokens: ``ids[B, L]``, ``mask[B, L]`` -> TokenFeatures with ``N = L`` and the input mask.

        All real tokens (start and end included) are outputs; ``pooled`` is the end token.
        ``prompt_index[B]`` selects text prompts per sample; prompt tokens never appear in the output.
        """
        mask = mask.to(device=ids.device, dtype=torch.bool)
        prompts = self._pool_prompts(self.text_prompts, prompt_index, "text")
        tokens, pooled = self.text(ids, mask, prompts)
        weight = self.text_weight_head(tokens).masked_fill(~mask, 0.0)
        # Zero the padding so that nothing downstream can pick up a meaningless feature.
        tokens = F.normalize(tokens, dim=-1) * mask.unsqueeze(-1)
        return TokenFeatures(tokens, mask, weight, F.normalize(pooled, dim=-1))

    # ---------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def query_image(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt-free pooled image features ``[B, D]`` (L2-normalised): the image prompt-pool queries."""
        return self.encode_image(images).pooled

    @torch.no_grad()
    def query_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prompt-free pooled text features ``[B, D]`` (L2-normalised): the text prompt-pool queries."""
        return self.encode_text(ids, mask).pooled

    def select_prompts(self, query_img: Optional[torch.Tensor], query_txt: Optional[torch.Tensor],
                       train_task: Optional[int] = None, task_id: Union[int, torch.Tensor, None] = None,
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """Pick an image and a text prompt slot per sample (see :meth:`PromptPool.select`).

        Either query may be None (e.g. encoding a text-only gallery). Returns ``(image_index[B] | None,
        text_index[B] | None, pull_loss)`` where ``pull_loss`` is the mean of the two pools' pull terms
        (0 when prompts are disabled or no query is given).
        """
        pull_terms = []
        image_index = text_index = None
        if self.image_prompts is not None and query_img is not None:
            image_index, pull = self.image_prompts.select(query_img, task_id=task_id, train_task=train_task)
            pull_terms.append(pull)
        if self.text_prompts is not None and query_txt is not None:
            text_index, pull = self.text_prompts.select(query_txt, task_id=task_id, train_task=train_task)
            pull_terms.append(pull)
        if pull_terms:
            pull_loss = torch.stack(pull_terms).mean()
        else:
            pull_loss = self.logit_scale.new_zeros(())
        return image_index, text_index, pull_loss

    def set_num_active_prompts(self, n: int) -> None:
        """Restrict inference-time prompt selection of both pools to slots ``0 .. n-1``."""
        for pool in (self.image_prompts, self.text_prompts):
            if pool is not None:
                pool.set_num_active(n)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                train_task: Optional[int] = None, task_id: Union[int, torch.Tensor, None] = None,
                ) -> DualEncoderOutput:
        """Query, select prompts and encode both modalities of a batch of pairs.

        Without prompts this is just ``encode_image`` and ``encode_text``.
        """
        image_index = text_index = None
        pull_loss = self.logit_scale.new_zeros(())
        if self.image_prompts is not None:
            image_index, text_index, pull_loss = self.select_prompts(
                self.query_image(images), self.query_text(ids, mask), train_task=train_task, task_id=task_id)
        return DualEncoderOutput(self.encode_image(images, image_index), self.encode_text(ids, mask, text_index),
                                 pull_loss, image_index, text_index)
