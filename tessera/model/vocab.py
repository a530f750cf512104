"""The extended vocabulary: the text tokenizer's ids first (unchanged), then Tessera's special
tokens, then the visual vocabulary.

    [0, T)                        text tokenizer (its own specials included: pad, bos, eos)
    T + 0..3                      <|image_start|> <|image_end|> <|frame|> <|cell|>
    + max_grid                    <h=1> .. <h=max_grid>    grid height of the next image
    + max_grid                    <w=1> .. <w=max_grid>    grid width
    + time_tokens                 <t=0> .. <t=time_tokens-1>  video frame time, in time_step units
    + visual (bpe interface)      one id per visual-BPE token (base codes, then merges)

The `rvq` interface has no visual ids: every grid cell is the `<|cell|>` id and its input
embedding comes from its codes (see `tessera.model.rvq_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass

SPECIAL_NAMES = ("<|image_start|>", "<|image_end|>", "<|frame|>", "<|cell|>")


@dataclass(frozen=True)
class Vocabulary:
    text_size: int
    """Ids of the text tokenizer, `len(tokenizer)` (added specials included)."""
    bos_id: int
    eos_id: int
    pad_id: int
    interface: str
    visual_size: int
    """bpe interface: the BPE's vocab_size; rvq: 0."""
    max_grid: int = 64
    time_tokens: int = 64
    time_step: float = 0.5

    def code_slots(self, n_codebooks: int) -> int:
        """C of the (n, C, D) `codes` beside the ids: one per codebook at the rvq interface's `<|cell|>`
        positions, one feature (as bits) at the continuous interface's code tokens, none for bpe."""
        return {"rvq": n_codebooks, "continuous": 1}.get(self.interface, 0)

    @property
    def image_start(self) -> int:
        return self.text_size

    @property
    def image_end(self) -> int:
        return self.text_size + 1

    @property
    def frame(self) -> int:
        return self.text_size + 2

    @property
    def cell(self) -> int:
        return self.text_size + 3

    @property
    def height_base(self) -> int:
        return self.text_size + 4

    @property
    def width_base(self) -> int:
        return self.height_base + self.max_grid

    @property
    def time_base(self) -> int:
        return self.width_base + self.max_grid

    @property
    def visual_base(self) -> int:
        return self.time_base + self.time_tokens

    @property
    def size(self) -> int:
        return self.visual_base + self.visual_size

    @property
    def num_new(self) -> int:
        return self.size - self.text_size

    def height_token(self, h: int) -> int:
        if not 1 <= h <= self.max_grid:
            raise ValueError(f"grid height {h} outside 1..max_grid={self.max_grid}")
        return self.height_base + h - 1

    def width_token(self, w: int) -> int:
        if not 1 <= w <= self.max_grid:
            raise ValueError(f"grid width {w} outside 1..max_grid={self.max_grid}")
        return self.width_base + w - 1

    def time_token(self, seconds: float) -> int:
        return self.time_base + min(max(int(round(seconds / self.time_step)), 0), self.time_tokens - 1)

    def visual_token(self, bpe_id: int) -> int:
        return self.visual_base + int(bpe_id)

    def is_visual(self, token: int) -> bool:
        """Tokens that belong to an image's content (routed to the visual expert under MoT)."""
        return token >= self.visual_base or token == self.cell

    def is_text(self, token: int) -> bool:
        return token < self.text_size

    def to_dict(self) -> dict:
        return {"text_size": self.text_size, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "interface": self.interface, "visual_size": self.visual_size, "max_grid": self.max_grid,
                "time_tokens": self.time_tokens, "time_step": self.time_step}

    @staticmethod
    def from_dict(d: dict) -> "Vocabulary":
        return Vocabulary(**d)

    def token_names(self) -> list[str]:
        """Names of the new ids, in order (written to tessera.json for people and other tools)."""
        names = list(SPECIAL_NAMES)
        names += [f"<h={i}>" for i in range(1, self.max_grid + 1)]
        names += [f"<w={i}>" for i in range(1, self.max_grid + 1)]
        names += [f"<t={i}>" for i in range(self.time_tokens)]
        names += [f"<v={i}>" for i in range(self.visual_size)]
        return names
