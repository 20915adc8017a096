"""The answer service: grounded answers with citations, and the live hallucination monitor of served traffic."""
