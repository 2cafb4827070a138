"""Runs a documentation snippet on one rank of a gloo job (tests/test_docs.py)."""


def run_snippet(rank, world, *, code, name):
    namespace = {"__name__": f"snippet:{name}"}
    exec(compile(code, name, "exec"), namespace)
    return "ran"
