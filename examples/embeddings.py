"""Embeddings of two 1,024-bp sequences, as in Helical's Caduceus example.

The weights of the default model come from the Hugging Face Hub (or its local cache) on first use.
"""

from caduceus import Caduceus, CaduceusConfig

caduceus_config = CaduceusConfig(model_name="caduceus-ph-4L-seqlen-1k-d118", batch_size=2, pooling_strategy="mean")
caduceus = Caduceus(configurer=caduceus_config)
sequence = ["ACTG" * int(1024 / 4), "TGCA" * int(1024 / 4)]
processed_data = caduceus.process_data(sequence)
embeddings = caduceus.get_embeddings(processed_data)
print(embeddings.shape)  # (2, 118)
