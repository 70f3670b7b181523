"""The zygote's heap before a fork (runtime/heap.py): pymalloc's free blocks are read from
the interpreter's own report and taken, so forked workers allocate in pools of their own."""
import json
import subprocess
import sys
import textwrap


def test_free_blocks_of_used_pools_are_taken():
    """In a fresh interpreter (this one's heap is pytest's): the report is read on every
    CPython CI runs (3.9 to 3.13), and filling leaves far fewer free blocks of the sizes a
    bytes object can take (a pool the fills opened themselves may remain, one per size)."""
    code = textwrap.dedent("""
        import json
        from kuiper_pool.runtime import heap
        before = heap.free_blocks()
        taken = heap.fill_free_blocks()
        after = heap.free_blocks()
        print(json.dumps([before, taken, after]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, taken, after = json.loads(out.stdout)
    assert set(map(int, before)) >= {16, 32, 48, 512}, before
    fillable = sum(n for size, n in before.items() if int(size) > 32)
    assert taken >= fillable / 2  # its own reading comes a moment later
    # the reading's own objects (5-tuples of short bytes: 64- and 48-byte blocks) are freed
    # after it is taken and before the fill; the test's second reading counts them as left
    others = [size for size in before if int(size) > 64]
    left = sum(after.get(size, 0) for size in others)
    assert left < sum(before[size] for size in others) / 4, (before, after)
