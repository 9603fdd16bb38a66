"""Seeded generator of math exercises with worked solutions: arithmetic, fractions, percentages, algebra.

`exercise(rng)` returns one problem + step-by-step solution; wording, names, units and layout vary widely.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

from experts.demo import mathwords

NAMES = mathwords.NAMES


def fmt_num(x: float | Fraction) -> str:
    """Integers without decimals, other values rounded to at most 2 places, fractions as a/b."""
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def signed(c: int, var: str = "", first: bool = False) -> str:
    """Render a term with its sign: ' + 3x', ' - 5', or '-2x' at the start of an expression."""
    coef = "" if var and abs(c) == 1 else str(abs(c))
    if first:
        return f"{'-' if c < 0 else ''}{coef}{var}"
    return f" {'-' if c < 0 else '+'} {coef}{var}"


def render(rng: random.Random, problem: str, steps: list[str], answer: str) -> str:
    """Lay out problem, steps and answer in one of several common textbook / forum styles."""
    head = rng.choice(["Problem: ", "Question: ", "Q: ", f"Exercise {rng.randint(1, 60)}. ", "", "**Problem.** ",
                       f"Example {rng.randint(1, 12)}: "])
    style = rng.randrange(5)
    if style == 0:
        body = "Solution:\n" + "\n".join(steps) + f"\nAnswer: {answer}"
    elif style == 1:
        body = "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1)) + f"\nThe answer is {answer}."
    elif style == 2:
        body = "\n".join(steps) + f"\n#### {answer}"
    elif style == 3:
        body = " ".join(s if s.endswith(".") else s + "." for s in steps) + f" Therefore, the answer is {answer}."
    else:
        body = "Let's work it out.\n" + "\n".join(f"- {s}" for s in steps) + f"\nSo the final answer is **{answer}**."
    sep = rng.choice(["\n", "\n\n"])
    return f"{head}{problem}{sep}{body}"


# ---------------------------------------------------------------- arithmetic
def order_of_operations(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 30) for _ in range(4))
    op = rng.choice(["+", "-"])
    expr = f"{a} {op} {b} × {c}" + (f" ÷ {d}" if c * b % d == 0 else "")
    prod = b * c // d if c * b % d == 0 else b * c
    steps = [f"Multiplication and division come before addition and subtraction, so first compute "
             f"{b} × {c}" + (f" ÷ {d} = {prod}" if c * b % d == 0 else f" = {prod}") + "."]
    val = a + prod if op == "+" else a - prod
    steps.append(f"Then {a} {op} {prod} = {val}.")
    return render(rng, rng.choice([f"Evaluate {expr}.", f"What is {expr}?", f"Compute the value of {expr}."]),
                  steps, str(val))


def long_division(rng: random.Random) -> str:
    d = rng.randint(3, 24)
    q, r = rng.randint(12, 400), rng.randint(0, d - 1)
    n = d * q + r
    steps = [f"{d} × {q} = {d * q}, which is the largest multiple of {d} not above {n}.",
             f"The remainder is {n} - {d * q} = {r}."]
    ask = rng.choice([f"Divide {n} by {d} and give the quotient and remainder.",
                      f"What is {n} ÷ {d}? Write the result with a remainder.",
                      f"Find q and r such that {n} = {d}q + r with 0 ≤ r < {d}."])
    return render(rng, ask, steps, f"{q} remainder {r}" if rng.random() < 0.5 else f"q = {q}, r = {r}")


def multiply(rng: random.Random) -> str:
    a, b = rng.randint(12, 999), rng.randint(11, 99)
    tens, ones = b // 10 * 10, b % 10
    steps = [f"Split {b} into {tens} + {ones}.", f"{a} × {tens} = {a * tens}.", f"{a} × {ones} = {a * ones}.",
             f"Add the partial products: {a * tens} + {a * ones} = {a * b}."]
    return render(rng, rng.choice([f"Calculate {a} × {b}.", f"What is {a} times {b}?", f"Multiply {a} by {b}."]),
                  steps, str(a * b))


def fraction_op(rng: random.Random) -> str:
    x = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    y = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice("+-×÷")
    if op in "+-":
        den = x.denominator * y.denominator // math.gcd(x.denominator, y.denominator)
        a, b = x.numerator * den // x.denominator, y.numerator * den // y.denominator
        res = x + y if op == "+" else x - y
        steps = [f"The least common denominator of {x.denominator} and {y.denominator} is {den}.",
                 f"Rewrite: {fmt_num(x)} = {a}/{den} and {fmt_num(y)} = {b}/{den}.",
                 f"{a}/{den} {op} {b}/{den} = {a + b if op == '+' else a - b}/{den}."]
    else:
        res = x * y if op == "×" else x / y
        if op == "÷":
            steps = [f"Dividing by {fmt_num(y)} is the same as multiplying by its reciprocal {y.denominator}/{y.numerator}."]
            y = 1 / y
        else:
            steps = []
        steps.append(f"Multiply numerators and denominators: ({x.numerator} × {y.numerator})/({x.denominator} × "
                     f"{y.denominator}) = {x.numerator * y.numerator}/{x.denominator * y.denominator}.")
    steps.append(f"In lowest terms this is {fmt_num(res)}.")
    return render(rng, rng.choice([f"Simplify {fmt_num(x)} {op} {fmt_num(y if op != '÷' else 1 / y)}.",
                                   f"Compute {fmt_num(x)} {op} {fmt_num(y if op != '÷' else 1 / y)} and reduce."]),
                  steps, fmt_num(res))


def percent_of(rng: random.Random) -> str:
    p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 60, 75, 80, 120]), rng.randint(2, 90) * 10
    val = p * n / 100
    steps = [f"{p}% means {p}/100 = {p / 100:g}.", f"{p / 100:g} × {n} = {fmt_num(val)}."]
    return render(rng, rng.choice([f"What is {p}% of {n}?", f"Find {p} percent of {n}.",
                                   f"Calculate {p}% of {n}."]), steps, fmt_num(val))


def percent_change(rng: random.Random) -> str:
    old = rng.randint(20, 500)
    new = old + rng.choice([-1, 1]) * rng.randint(1, old // 2)
    change = (new - old) / old * 100
    word = "increase" if new > old else "decrease"
    thing = rng.choice(["The price of a ticket", "A town's population", "The number of visitors",
                        "Monthly rent", "A runner's weekly distance", "The cost of a meal"])
    steps = [f"The change is {new} - {old} = {new - old}.",
             f"Divide by the original value: {new - old}/{old} = {(new - old) / old:.4f}.",
             f"As a percentage that is a {abs(change):.1f}% {word}."]
    return render(rng, f"{thing} went from {old} to {new}. What is the percent {word}?", steps,
                  f"{abs(change):.1f}%")


def linear_equation(rng: random.Random) -> str:
    x = rng.randint(-12, 15)
    a = rng.choice([i for i in range(-9, 10) if i not in (0, 1)])
    b = rng.randint(-20, 20)
    c = a * x + b
    v = rng.choice("xyznkt")
    steps = [f"Subtract {b} from both sides: {a}{v} = {c} - ({b}) = {c - b}." if b else f"{a}{v} = {c}.",
             f"Divide both sides by {a}: {v} = {c - b}/{a} = {x}.",
             f"Check: {a}({x}){signed(b)} = {c}."]
    eq = f"{signed(a, v, first=True)}{signed(b) if b else ''} = {c}"
    return render(rng, rng.choice([f"Solve for {v}: {eq}.", f"Find {v} if {eq}.", f"Solve the equation {eq}."]),
                  steps, f"{v} = {x}")


def linear_both_sides(rng: random.Random) -> str:
    x = rng.randint(-10, 12)
    a, c = rng.sample([i for i in range(-8, 9) if i], 2)
    b = rng.randint(-15, 15)
    d = a * x + b - c * x
    steps = [f"Move the {'x'} terms to the left: {a}x - ({c}x) = {a - c}x.",
             f"Move the constants to the right: {d} - ({b}) = {d - b}.",
             f"So {a - c}x = {d - b}, giving x = {fmt_num(Fraction(d - b, a - c))}."]
    eq = f"{signed(a, 'x', True)}{signed(b)} = {signed(c, 'x', True)}{signed(d)}"
    return render(rng, f"Solve {eq}.", steps, f"x = {fmt_num(Fraction(d - b, a - c))}")


def system_2x2(rng: random.Random) -> str:
    x, y = rng.randint(-6, 9), rng.randint(-6, 9)
    a, b, c, d = (rng.choice([i for i in range(-5, 6) if i]) for _ in range(4))
    if a * d - b * c == 0:
        d += 1 if d != -1 else 2
    e, f = a * x + b * y, c * x + d * y
    det = a * d - b * c
    steps = [f"Multiply the first equation by {d} and the second by {b}, then subtract to eliminate y.",
             f"({a}·{d} - {b}·{c})x = {e}·{d} - {f}·{b}, so {det}x = {e * d - f * b} and x = {x}.",
             f"Substitute into the first equation: {a}({x}){signed(b, 'y')} = {e}, so {b}y = {e - a * x} and y = {y}."]
    eq1 = f"{signed(a, 'x', True)}{signed(b, 'y')} = {e}"
    eq2 = f"{signed(c, 'x', True)}{signed(d, 'y')} = {f}"
    return render(rng, f"Solve the system of equations:\n{eq1}\n{eq2}", steps, f"x = {x}, y = {y}")


def quadratic(rng: random.Random) -> str:
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    b, c = -(r1 + r2), r1 * r2
    poly = f"x^2{signed(b, 'x') if b else ''}{signed(c) if c else ''}"
    if rng.random() < 0.5:
        steps = [f"Look for two numbers whose product is {c} and whose sum is {b}: {-r1} and {-r2}.",
                 f"So {poly} = (x{signed(-r1)})(x{signed(-r2)}).",
                 f"Setting each factor to zero gives x = {r1} or x = {r2}."]
    else:
        disc = b * b - 4 * c
        steps = [f"Use the quadratic formula with a = 1, b = {b}, c = {c}.",
                 f"The discriminant is b^2 - 4ac = {b * b} - {4 * c} = {disc}, and √{disc} = {math.isqrt(disc)}.",
                 f"x = ({-b} ± {math.isqrt(disc)})/2, so x = {max(r1, r2)} or x = {min(r1, r2)}."]
    roots = sorted({r1, r2})
    return render(rng, rng.choice([f"Solve {poly} = 0.", f"Find the roots of {poly}.",
                                   f"For which values of x is {poly} equal to zero?"]),
                  steps, " or ".join(f"x = {r}" for r in roots))


def like_terms(rng: random.Random) -> str:
    a, b, c, d = (rng.choice([i for i in range(-9, 10) if i]) for _ in range(4))
    v = rng.choice("abxymn")
    expr = f"{signed(a, v, True)}{signed(b)}{signed(c, v)}{signed(d)}"
    steps = [f"Group the {v}-terms: {a}{v} + ({c}{v}) = {a + c}{v}.", f"Group the constants: {b} + ({d}) = {b + d}."]
    res = f"{signed(a + c, v, True) if a + c else ''}{signed(b + d, '', not (a + c))}"
    return render(rng, f"Simplify {expr}.", steps, res or "0")


def expand(rng: random.Random) -> str:
    a, b, c, d = (rng.choice([i for i in range(-7, 8) if i]) for _ in range(4))
    ax, cx = signed(a, "x", True), signed(c, "x", True)
    steps = [f"First: ({ax})({cx}) = {a * c}x^2.", f"Outer and inner: ({ax})({d}) + ({b})({cx}) = {a * d + b * c}x.",
             f"Last: ({b})({d}) = {b * d}."]
    res = f"{a * c}x^2{signed(a * d + b * c, 'x')}{signed(b * d)}"
    return render(rng, f"Expand ({signed(a, 'x', True)}{signed(b)})({signed(c, 'x', True)}{signed(d)}).", steps, res)


def gcd_lcm(rng: random.Random) -> str:
    g = rng.randint(2, 15)
    a, b = g * rng.randint(2, 12), g * rng.randint(2, 12)
    gg, l = math.gcd(a, b), a * b // math.gcd(a, b)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}.")
        x, y = y, x % y
    steps.append(f"So gcd({a}, {b}) = {gg}, and lcm = {a} × {b} / {gg} = {l}.")
    return render(rng, f"Find the greatest common divisor and least common multiple of {a} and {b}.", steps,
                  f"gcd = {gg}, lcm = {l}")


def prime_factors(rng: random.Random) -> str:
    n = math.prod(rng.choice([2, 2, 2, 3, 3, 5, 7, 11, 13]) for _ in range(rng.randint(3, 6)))
    steps, m, p = [], n, 2
    while m > 1:
        while m % p == 0:
            steps.append(f"{m} ÷ {p} = {m // p}.")
            m //= p
        p += 1
    counts = {q: 0 for q in range(2, p)}
    m = n
    for q in counts:
        while m % q == 0:
            counts[q] += 1
            m //= q
    res = " × ".join(f"{q}^{k}" if k > 1 else str(q) for q, k in counts.items() if k)
    return render(rng, f"Write {n} as a product of prime factors.", steps, res)


def powers(rng: random.Random) -> str:
    b, m, n = rng.randint(2, 7), rng.randint(2, 6), rng.randint(1, 5)
    kind = rng.randrange(3)
    if kind == 0:
        return render(rng, f"Simplify {b}^{m} × {b}^{n}.", [(f"When multiplying powers with the same base, add the "
                      f"exponents: {m} + {n} = {m + n}."), f"{b}^{m + n} = {b ** (m + n)}."], f"{b ** (m + n)}")
    if kind == 1:
        return render(rng, f"Simplify ({b}^{m})^{n}.", [(f"A power of a power multiplies the exponents: {m} × {n} = "
                      f"{m * n}."), f"So the result is {b}^{m * n}."], f"{b}^{m * n}")
    k = b ** m
    return render(rng, f"Solve {b}^x = {k}.", [f"Write {k} as a power of {b}: {k} = {b}^{m}.",
                  "Equal bases mean equal exponents."], f"x = {m}")


def derivative(rng: random.Random) -> str:
    coefs = [rng.randint(-6, 9) for _ in range(rng.randint(2, 4))] + [rng.randint(1, 5)]
    deg = len(coefs) - 1
    terms = [(c, deg - i) for i, c in enumerate(reversed(coefs)) if c]
    poly = "".join(_term(c, e, i == 0) for i, (c, e) in enumerate(terms))
    dterms = [(c * e, e - 1) for c, e in terms if e > 0]
    dpoly = "".join(_term(c, e, i == 0) for i, (c, e) in enumerate(dterms)) or "0"
    steps = ["Use the power rule d/dx x^n = n x^(n-1) on each term."] + [
        f"d/dx ({_term(c, e, True)}) = {_term(c * e, e - 1, True)}." for c, e in terms if e > 0]
    return render(rng, rng.choice([f"Differentiate f(x) = {poly}.", f"Find the derivative of {poly}.",
                                   f"Compute f'(x) for f(x) = {poly}."]), steps, f"f'(x) = {dpoly}")


def integral(rng: random.Random) -> str:
    a, b = rng.randint(1, 6), rng.randint(1, 9)
    lo, hi = 0, rng.randint(1, 4)
    val = Fraction(a, 3) * (hi ** 3 - lo ** 3) + Fraction(b, 1) * (hi - lo)
    steps = [f"An antiderivative of {a}x^2 + {b} is F(x) = {fmt_num(Fraction(a, 3))}x^3 + {b}x.",
             f"F({hi}) - F({lo}) = {fmt_num(Fraction(a, 3) * hi ** 3)} + {b * hi} - 0 = {fmt_num(val)}."]
    return render(rng, f"Evaluate the integral of {a}x^2 + {b} from x = {lo} to x = {hi}.", steps, fmt_num(val))


def _term(c: int, e: int, first: bool) -> str:
    var = "" if e == 0 else ("x" if e == 1 else f"x^{e}")
    if e == 0:
        return signed(c, "", first)
    return signed(c, var, first)


ALGEBRA = [order_of_operations, long_division, multiply, fraction_op, percent_of, percent_change, linear_equation,
           linear_both_sides, system_2x2, quadratic, like_terms, expand, gcd_lcm, prime_factors, powers,
           derivative, integral]


def exercise(rng: random.Random) -> str:
    """One exercise; word problems (mathwords) and symbolic ones are drawn about equally often."""
    if rng.random() < 0.55:
        return rng.choice(mathwords.WORD_PROBLEMS)(rng, render)
    return rng.choice(ALGEBRA)(rng)


def exercises(seed: int, max_chars: int) -> list[str]:
    """Documents of a few exercises each, up to max_chars in total; same seed, same documents."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < max_chars:
        doc = "\n\n".join(exercise(rng) for _ in range(rng.randint(1, 4)))
        docs.append(doc)
        total += len(doc)
    return docs
