"""Generation: the only code that drives diffusers pipelines — request → job, LoRA schedule, conditioning
(emphasis, 75-token chunks, embeddings), samplers, infotext. Submodules import lazily; ``emphasis`` needs no
torch."""
