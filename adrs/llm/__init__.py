"""LLM side of the loop: config models (`config`), an async OpenAI-compatible client (`client`),
budget (`budget`), proposals (`proposal`).

Nothing is imported here: `adrs.config` needs only `adrs.llm.config`, and importing the client
(openai) and proposals (torch, through the mutation code) on every CLI start cost ~2.5 s.
"""
