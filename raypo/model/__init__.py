"""Model side, free of Ray: the listwise batch and its prefix-shared layout, attention masks, the log-prob
head, the listwise forward, response chunking, model loading (ZeRO-3, LoRA, sources) and tiny models."""
