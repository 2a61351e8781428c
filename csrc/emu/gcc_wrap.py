#!/usr/bin/env python3
"""gcc -wrapper for emulated builds: rewrites `extern __shared__ T name[];` before cc1plus sees it.

Why: a static `__shared__` array must become a static-storage variable (the emulator makes it
block-scope `thread_local`), but `extern __shared__ T name[];` declares an array of unknown size
that no translation unit defines; no single macro can serve both, and a block-scope extern
cannot be aliased to the emulator's buffer. So for the compiled source file (not the headers it
includes) each such declaration is replaced, on the same lines, by
RIFORMER_EMU_EXTERN_SHARED(T, name), a pointer to the emulator's dynamic shared buffer. A
`#line` directive keeps diagnostics and std::source_location on the original file and lines.

With `-wrapper python3,csrc/emu/gcc_wrap.py` GCC runs `python3 gcc_wrap.py <program> <args...>`
for every subprocess (cc1plus, as, collect2), so no executable bit is needed; everything but
cc1plus is passed through unchanged.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

EXTERN_SHARED = re.compile(
    r'\bextern\s+__shared__\s+(?P<type>[^;{}\[\]]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;')
# Alignment and attributes cannot appear in the cast the replacement makes; the emulator's
# buffer is 128-byte aligned, which covers any alignment a kernel asks for.
STRIP = re.compile(r'__align__\s*\([^)]*\)|alignas\s*\([^)]*\)|__attribute__\s*\(\(.*?\)\)')
# cc1plus options whose value is the next argument (so it is not mistaken for the source file).
TAKES_VALUE = {'-o', '-include', '-imacros', '-imultiarch', '-iquote', '-isystem', '-idirafter', '-iprefix',
               '-iwithprefix', '-iwithprefixbefore', '-isysroot', '-dumpdir', '-dumpbase', '-dumpbase-ext',
               '-auxbase', '-auxbase-strip', '-MF', '-MT', '-MQ', '-MD', '-MMD', '--param', '-D', '-U', '-I'}
SOURCE_EXT = ('.cu', '.cuh', '.cc', '.cpp', '.cxx', '.c++', '.C')


def rewrite(text):
    def repl(m):
        ctype = ' '.join(STRIP.sub(' ', m.group('type')).split())
        return 'RIFORMER_EMU_EXTERN_SHARED(%s, %s);' % (ctype, m.group('name')) + '\n' * m.group(0).count('\n')
    return EXTERN_SHARED.sub(repl, text)


def main(argv):
    prog, args = argv[0], argv[1:]
    if os.path.basename(prog) != 'cc1plus':
        os.execvp(prog, [prog] + args)
    tmp = None
    out = list(args)
    for i, a in enumerate(args):
        if a.startswith('-') or (i > 0 and args[i - 1] in TAKES_VALUE) or not a.endswith(SOURCE_EXT):
            continue
        if not os.path.isfile(a):
            continue
        with open(a, encoding='utf-8', errors='surrogateescape') as f:
            text = f.read()
        new = rewrite(text)
        if new == text:
            continue
        tmp = tmp or tempfile.mkdtemp(prefix='riformer_emu_')
        path = os.path.join(tmp, os.path.basename(a))
        with open(path, 'w', encoding='utf-8', errors='surrogateescape') as f:
            f.write('#line 1 "%s"\n' % a.replace('\\', '\\\\').replace('"', '\\"'))
            f.write(new)
        # Quote includes are looked up next to the file first: keep that the original directory.
        out[i:i + 1] = ['-iquote', os.path.dirname(os.path.abspath(a)), path]
        break
    try:
        return subprocess.call([prog] + out)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
