"""Shared inputs: punctuation (skiplist), upper case (lowercasing), and texts longer than every
length limit (truncation); short enough to keep the tests fast."""

QUERIES = [
    "What is the Role of TP53 in cancer?",
    "covid-19 vaccines; efficacy (RCT), side-effects!",
    "short",
    "A VERY long query that keeps going, " * 8,
]

DOCUMENTS = [
    "Microstructural development of human newborn cerebral white matter, assessed in vivo.",
    "Hello, World! (This is: a test...) -- with [brackets] & {braces}; 100% punctuation?",
    "The MRI sequence; DIFFUSION-weighted imaging. " * 20,
    "tiny",
    "Alterations of the architecture of cerebral white matter in the developing brain. " * 45,
]
