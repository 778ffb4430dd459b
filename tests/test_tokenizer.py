import pytest
import torch

from caduceus.tokenizer import (
    COMPLEMENT_IDS,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    CaduceusTokenizer,
    encode_sequence,
    reverse_complement,
    reverse_complement_batch,
    reverse_complement_ids,
)


def test_published_ids():
    tok = CaduceusTokenizer()
    assert tok.encode("ACGTN") == [7, 8, 9, 10, 11, SEP_ID]
    assert (PAD_ID, MASK_ID, SEP_ID) == (4, 3, 1)
    assert tok.encode("acgt", add_special_tokens=False) == [7, 8, 9, 10]


def test_helical_batch_left_padding():
    batch = CaduceusTokenizer()(["A", "CC", "TTTT", "ACGTN", "ACG"])
    assert batch.input_ids.tolist() == [
        [4, 4, 4, 4, 7, 1], [4, 4, 4, 8, 8, 1], [4, 10, 10, 10, 10, 1], [7, 8, 9, 10, 11, 1], [4, 4, 7, 8, 9, 1]
    ]
    assert batch.attention_mask.tolist()[0] == [0, 0, 0, 0, 1, 1]


def test_sep_switchable_and_max_length():
    tok = CaduceusTokenizer(model_max_length=3, add_special_tokens=False)
    assert tok(["ACGTACGT"]).input_ids.tolist() == [[7, 8, 9]]
    assert CaduceusTokenizer(model_max_length=3)(["ACGTACGT"]).input_ids.tolist() == [[7, 8, 9, 1]]


def test_iupac_codes_become_n():
    assert encode_sequence("RYSWKMBDHVryswkmbdhv").tolist() == [11] * 20


@pytest.mark.parametrize(
    "bad, position, char", [("ACGU", 3, "U"), ("AC GT", 2, " "), ("ACG-", 3, "-"), ("AÇG", 1, "Ç")]
)
def test_invalid_character_names_sequence_position_and_char(bad, position, char):
    with pytest.raises(ValueError) as info:
        CaduceusTokenizer()(["ACGT", bad])
    message = str(info.value)
    assert "sequence 1" in message and f"position {position}" in message and repr(char) in message


def test_reverse_complement_strings_and_ids():
    assert reverse_complement("AACGTN") == "NACGTT"
    assert reverse_complement("acgR") == "Ycgt"
    ids = torch.tensor([[7, 8, 9, 10, 11, 1]])
    assert reverse_complement_ids(ids).tolist() == [[1, 11, 7, 8, 9, 10]]
    assert COMPLEMENT_IDS[COMPLEMENT_IDS].tolist() == list(range(12))


def test_reverse_complement_batch_keeps_left_padding_and_sep():
    tok = CaduceusTokenizer()
    seqs = ["AACG", "T"]
    batch = tok(seqs)
    rc = reverse_complement_batch(batch.input_ids, batch.attention_mask)
    assert rc.tolist() == tok([reverse_complement(s) for s in seqs]).input_ids.tolist()


def test_single_string_is_one_sequence():
    assert CaduceusTokenizer()("ACGT").input_ids.shape == (1, 5)
