"""Character tokenizer with the published Caduceus vocabulary.

Ids: [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6 A=7 C=8 G=9 T=10 N=11. A sequence
is upper-cased, one [SEP] is appended (switchable off) and batches are padded on the left, as the
upstream ``CaduceusTokenizer`` does. IUPAC ambiguity codes become N; any other character is an error
that names the sequence index, the position and the character, raised before any work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

CLS_ID, SEP_ID, BOS_ID, MASK_ID, PAD_ID, RESERVED_ID, UNK_ID = range(7)
A_ID, C_ID, G_ID, T_ID, N_ID = 7, 8, 9, 10, 11
VOCAB = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]", "A", "C", "G", "T", "N"]
VOCAB_SIZE = len(VOCAB)
BASE_IDS = (A_ID, C_ID, G_ID, T_ID)
IUPAC_AMBIGUITY = "RYSWKMBDHV"

# id -> complement id: A<->T, C<->G, everything else (specials, N) to itself. Padded to 16 by the model.
COMPLEMENT_IDS = np.arange(VOCAB_SIZE, dtype=np.int64)
COMPLEMENT_IDS[[A_ID, C_ID, G_ID, T_ID]] = [T_ID, G_ID, C_ID, A_ID]

_INVALID = -1
_CHAR_TO_ID = np.full(256, _INVALID, dtype=np.int64)
for _char, _id in zip("ACGTN", (A_ID, C_ID, G_ID, T_ID, N_ID)):
    _CHAR_TO_ID[ord(_char)] = _CHAR_TO_ID[ord(_char.lower())] = _id
for _char in IUPAC_AMBIGUITY:
    _CHAR_TO_ID[ord(_char)] = _CHAR_TO_ID[ord(_char.lower())] = N_ID

_COMPLEMENT_CHARS = str.maketrans("ACGTNRYSWKMBDHV" + "acgtnryswkmbdhv", "TGCANYRSWMKVHDB" + "tgcanyrswmkvhdb")


def encode_sequence(sequence: str, index: int = 0) -> np.ndarray:
    """Ids of the bases of one sequence (no special tokens); ``index`` names it in errors."""
    if not isinstance(sequence, str):
        raise TypeError(f"sequence {index}: expected a str, got {type(sequence).__name__}")
    raw = sequence.encode("ascii", errors="replace") if not sequence.isascii() else sequence.encode("ascii")
    ids = _CHAR_TO_ID[np.frombuffer(raw, dtype=np.uint8)]
    bad = np.flatnonzero(ids == _INVALID)
    if bad.size:
        position = int(bad[0])
        raise ValueError(
            f"sequence {index}: invalid character {sequence[position]!r} at position {position} "
            f"(allowed: A C G T N and the IUPAC codes {' '.join(IUPAC_AMBIGUITY)}, any case)"
        )
    return ids


def reverse_complement(sequence: str) -> str:
    """Reverse complement of a DNA string (case kept; IUPAC codes complemented)."""
    return sequence.translate(_COMPLEMENT_CHARS)[::-1]


def reverse_complement_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Reverse complement of a (..., L) id tensor: complement every id and reverse the last axis.

    Note that this also moves left padding to the right; use ``reverse_complement_batch`` to keep it left.
    """
    complement = torch.as_tensor(COMPLEMENT_IDS, device=input_ids.device)
    return complement[input_ids].flip(-1)


@dataclass
class Encoding:
    """A padded batch: ``input_ids`` (N, L) int64 and ``attention_mask`` (N, L), 1 on real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class CaduceusTokenizer:
    """Tokenizer compatible with the upstream ``CaduceusTokenizer`` ids, padding side and [SEP].

    ``model_max_length`` caps the number of bases (the [SEP] comes on top, as upstream).
    """

    pad_token_id = PAD_ID
    mask_token_id = MASK_ID
    sep_token_id = SEP_ID
    vocab_size = VOCAB_SIZE
    padding_side = "left"

    def __init__(self, model_max_length: int | None = None, add_special_tokens: bool = True) -> None:
        self.model_max_length = model_max_length
        self.add_special_tokens = add_special_tokens

    @property
    def complement_map(self) -> dict[int, int]:
        return {i: int(c) for i, c in enumerate(COMPLEMENT_IDS)}

    def encode(self, sequence: str, add_special_tokens: bool | None = None, index: int = 0) -> list[int]:
        ids = encode_sequence(sequence, index)
        if self.model_max_length is not None:
            ids = ids[: self.model_max_length]
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return ids.tolist() + ([SEP_ID] if special else [])

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i < A_ID))

    def __call__(
        self,
        sequences: Sequence[str] | str,
        max_length: int | None = None,
        add_special_tokens: bool | None = None,
    ) -> Encoding:
        """Encode and left-pad a batch. Every sequence is checked before any is encoded into the batch.

        ``max_length`` caps the number of bases per sequence (default: ``model_max_length``); sequences
        are padded to the longest one.
        """
        if isinstance(sequences, str):
            sequences = [sequences]
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        cap = max_length if max_length is not None else self.model_max_length
        rows = [encode_sequence(s, i) for i, s in enumerate(sequences)]
        if cap is not None:
            rows = [r[:cap] for r in rows]
        width = max((len(r) for r in rows), default=0) + int(special)
        input_ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            n = len(row) + int(special)
            if n:
                input_ids[i, width - n : width - int(special)] = row
                if special:
                    input_ids[i, -1] = SEP_ID
                mask[i, width - n :] = 1
        return Encoding(torch.from_numpy(input_ids), torch.from_numpy(mask))


def reverse_complement_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reverse complement each left-padded row's bases in place of the bases, keeping pads on the left
    and a trailing [SEP] at the end, so that the RC strand is tokenised as its string would be."""
    out = input_ids.clone()
    complement = torch.as_tensor(COMPLEMENT_IDS, device=input_ids.device)
    for i in range(input_ids.shape[0]):
        real = attention_mask[i].bool()
        ids = input_ids[i, real]
        has_sep = ids.numel() > 0 and int(ids[-1]) == SEP_ID
        bases = ids[:-1] if has_sep else ids
        rc = complement[bases.flip(0)]
        out[i, real] = torch.cat([rc, ids[-1:]]) if has_sep else rc
    return out
