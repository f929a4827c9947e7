"""Which notebook names a cell needs: Python's own scopes decide, not a bare AST walk."""

import ast

from nbparallel.cellcode import free_names

STAGE = """
import numpy as np
W = W_init.copy()
def forward(x, ctx):
    ctx["x"] = x
    return np.tanh(x @ W + b) + [k * z for k in range(3)][0]
def step():
    global W
    W -= lr
class Layer:
    size = Q
total += 1
"""


def test_function_parameters_and_locals_are_not_notebook_names() -> None:
    names = free_names(ast.parse(STAGE))
    assert names == {"W", "W_init", "b", "lr", "np", "z", "Q", "total"}
    assert "x" not in names and "ctx" not in names and "k" not in names


def test_module_level_reads_count_even_when_assigned_later() -> None:
    assert free_names(ast.parse("y = x + 1\nx = 2\nprint(len(y))")) == {"x", "y"}


def test_builtins_are_never_shipped() -> None:
    assert free_names(ast.parse("print(len(range(3)))")) == set()
