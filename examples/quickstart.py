"""The main job on a fresh machine, offline: embed DNA with the bundled default model (pretrained by this
project on human GRCh37) and ask it for a masked base on both strands."""

import torch

from caduceus import Caduceus, CaduceusConfig, CaduceusForMaskedLM
from caduceus.modeling import conjoined_logits
from caduceus.tokenizer import MASK_ID, VOCAB

sequences = [
    "TGGTAATTCCTAGAAGCGGAATTGCTGGCACCCATGGCCTTTGGGGTCTCCTCTATTTTGATGG",  # GRCh37 chr20:35,040,001-35,040,064
    "ACGTTGCA" * 100,
]
caduceus = Caduceus(CaduceusConfig(pooling_strategy="mean", rc="average"))  # default: the bundled Ph model
embeddings = caduceus.get_embeddings(caduceus.process_data(sequences))
print(f"model {caduceus.config['model_name']} on {caduceus.device}: embeddings {embeddings.shape}")

masked_lm = CaduceusForMaskedLM.from_pretrained(caduceus.config["model_name"])
batch = caduceus.tokenizer([sequences[0]], add_special_tokens=False)
position = 30
masked = batch.input_ids.clone()
masked[0, position] = MASK_ID
with torch.no_grad():
    probabilities = conjoined_logits(masked_lm, masked)[0, position, 7:11].softmax(-1)
print(f"P(base at position {position} | context), true base {VOCAB[int(batch.input_ids[0, position])]}: "
      + ", ".join(f"{base} {p:.2f}" for base, p in zip("ACGT", probabilities.tolist(), strict=True)))
