"""The paper's own numbers (Song et al., EMNLP 2025), transcribed from docs/mixsga-paper.md §5.

Shown beside ours for the direction of each effect; never used to compute anything of ours.
Keys are the labels our tables use (ratio "x:y:z" over group sizes 1:2:4, keep as a fraction).
"""

from __future__ import annotations

#: Our offline families -> the paper model their table rows are compared with (TinyLlama only in Table 2 / Fig. 3).
PAPER_MODEL = {"opt": "OPT-125m", "llama3": "Llama3.2-1B", "gemma2": "Gemma2-2B", "tinyllama": "TinyLlama-1.1B"}

#: Table 1 (SFT, Dolly, 50 % KV): (model, ratio) -> (Dolly ROUGE-L, average ROUGE-L over the 5 sets).
TABLE1 = {
    ("OPT-125m", "0:1:0"): (17.70, 11.22), ("OPT-125m", "1:1:2"): (19.80, 12.80), ("OPT-125m", "3:1:6"): (17.65, 11.56),
    ("OPT-355m", "0:1:0"): (21.11, 12.63), ("OPT-355m", "1:1:2"): (17.21, 12.53), ("OPT-355m", "3:1:6"): (21.43, 13.71),
    ("Llama3.2-1B", "0:1:0"): (20.09, 13.63), ("Llama3.2-1B", "1:1:2"): (18.87, 14.12),
    ("Llama3.2-1B", "3:1:6"): (20.11, 16.10),
    ("Llama3.2-3B", "0:1:0"): (23.26, 16.42), ("Llama3.2-3B", "1:1:2"): (25.49, 19.14),
    ("Llama3.2-3B", "3:1:6"): (25.57, 19.17),
    ("Llama3.1-8B", "0:1:0"): (27.40, 19.97), ("Llama3.1-8B", "1:1:2"): (26.50, 25.04),
    ("Llama3.1-8B", "3:1:6"): (28.47, 27.08),
    ("Gemma2-2B", "0:1:0"): (25.68, 19.26), ("Gemma2-2B", "1:1:2"): (24.79, 21.39), ("Gemma2-2B", "3:1:6"): (26.15, 22.70),
}

#: Table 2 (TinyLlama CPT, 50 % KV): method -> (average zero-shot accuracy %, WikiText-2 perplexity).
TABLE2 = {"gqa": (48.41, 22.66), "cla": (47.88, 24.62), "mixsga": (48.57, 20.46)}

#: Table 3 (H2O on GQA / mixSGA at 50 % KV): (keep, inner method) -> (average accuracy %, WikiText-2 perplexity).
TABLE3 = {
    (0.8, "gqa"): (47.73, 22.70), (0.8, "mixsga"): (48.31, 20.53),
    (0.6, "gqa"): (47.16, 22.72), (0.6, "mixsga"): (47.84, 20.63),
    (0.4, "gqa"): (46.78, 22.80), (0.4, "mixsga"): (47.25, 20.98),
    (0.2, "gqa"): (42.81, 23.56), (0.2, "mixsga"): (43.62, 22.19),
}

#: Table 4 (Llama3.2-1B): ratio -> (Dolly ROUGE-L, average ROUGE-L).
TABLE4 = {"1:9:2": (18.41, 12.20), "1:6:2": (19.60, 13.31), "1:1:2": (18.87, 14.12)}

#: Table 5 (Llama3.2-1B): ratio -> (Dolly ROUGE-L, average ROUGE-L).
TABLE5 = {"3:1:6": (20.11, 16.10), "3:4:0": (18.11, 14.35), "1:1:2": (18.87, 14.12), "1:2:0": (13.94, 11.08)}

#: Table 6 (Gemma2-2B, 3:1:6): variant -> (Dolly ROUGE-L, average ROUGE-L over 4 sets as printed).
TABLE6 = {"learned router": (26.15, 21.20), "random router": (24.65, 17.68), "no aux loss": (10.07, 7.35)}

#: Table 6 text: decode-time expert fractions of the no-aux-loss model on Dolly.
TABLE6_NO_AUX_DECODE_FRACTIONS = (0.3458, 0.3306, 0.3236)

#: Table 11 (Gemma2-2B): ratio -> (Dolly ROUGE-L, average ROUGE-L over 4 sets).
TABLE11 = {
    "1:17:2": (20.61, 12.94), "1:7:2": (23.49, 16.50), "3:11:6": (25.36, 18.35),
    "1:2:2": (25.80, 18.46), "1:1:2": (24.79, 19.90), "3:1:6": (26.15, 21.20),
}
