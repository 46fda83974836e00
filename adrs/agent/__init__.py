"""Agent mode: one tool-using LLM conversation over many turns, scored and archived like the loop.

Modules: ``config`` (the ``agent:`` section), ``tools`` (tool schemas and handlers),
``context`` (what of the conversation is sent each turn), ``transcript`` (the conversation
on disk, from which a session resumes), ``steering`` (review notes and pauses),
``session`` (the turn loop) and ``command`` (what ``adrs agent`` and ``adrs resume`` run).
"""
from adrs.agent.config import AgentConfig

__all__ = ["AgentConfig"]
