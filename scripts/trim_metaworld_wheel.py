"""Copy a Meta-World wheel without the texture images that none of its files name.

The device machine takes at most 64 MiB of tree a call, and metaworld 3.1.1's wheel (37 MB, mostly
textures) does not fit beside the repo and mujoco. Images no XML or Python file of the package
refers to cannot change a rendered frame, so leaving them out keeps the testbed as it is.

Usage: python scripts/trim_metaworld_wheel.py IN.whl OUT_DIR   (writes OUT_DIR/<same name>)
"""

import sys
import zipfile
from pathlib import Path


def trim(src: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        text = b"\n".join(z.read(n) for n in names if n.endswith((".xml", ".py")))
        unused = {n for n in names if n.endswith(".png") and Path(n).name.encode() not in text}
        freed = sum(z.getinfo(n).file_size for n in unused)
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as w:
            for n in names:
                if n in unused:
                    continue
                data = z.read(n)
                if n.endswith(".dist-info/RECORD"):  # the record lists every file the wheel installs
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if line.split(b",")[0].decode() not in unused)
                w.writestr(z.getinfo(n), data)
    print(f"{dst}: left out {len(unused)} unreferenced images ({freed / 2**20:.1f} MiB)")
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    trim(Path(sys.argv[1]), Path(sys.argv[2]))
