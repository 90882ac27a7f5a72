"""GPU names from a pci.ids database (the small fixture beside this file), ids as fallback."""

from __future__ import annotations

import os
from pathlib import Path

from autoecoops.platforms.machine_ops.inventory import PCI_IDS, PciNames, _gpus

FIXTURE = Path(__file__).parent / "data" / "pci.ids"


def test_names_come_from_the_vendors_block_only() -> None:
    names = PciNames((FIXTURE,))
    assert names.names("0x10de", "0x2204") == ("NVIDIA Corporation", "GA102 [GeForce RTX 3090]")
    assert names.names("0x10DE", "0x20b0") == ("NVIDIA Corporation", "GA100 [A100 SXM4 40GB]")
    assert names.names("1af4", "1050") == ("Red Hat, Inc.", "Virtio 1.0 GPU")
    # 2204 is a subsystem id under AMD and an NVIDIA device: AMD's block has no such device.
    assert names.names("0x1002", "0x2204") == ("Advanced Micro Devices, Inc. [AMD/ATI]", "")
    # 10de is a subsystem vendor inside NVIDIA's block, never a device of 1af4.
    assert names.names("0x1af4", "0x10de") == ("Red Hat, Inc.", "")
    assert names.names("0xabcd", "0x0001") == ("", "")  # vendor unknown
    assert names.names("0xffff", "0x0000") == ("Illegal Vendor ID", "")  # the last vendor
    assert names.names("", "") == ("", "")


def test_no_database_means_no_names_and_nothing_read_until_asked(tmp_path: Path) -> None:
    names = PciNames((tmp_path / "missing.ids", FIXTURE))
    assert names._data is None  # lazily: constructing reads nothing
    assert names.names("0x10de", "0x2204")[0] == "NVIDIA Corporation"  # the second path
    assert PciNames((tmp_path / "missing.ids",)).names("0x10de", "0x2204") == ("", "")
    assert (
        Path("/usr/share/misc/pci.ids") in PCI_IDS and Path("/usr/share/hwdata/pci.ids") in PCI_IDS
    )


def _device(base: Path, slot: str, cls: str, vendor: str, device: str, driver: str = "") -> None:
    d = base / "devices" / slot
    d.mkdir(parents=True)
    (d / "class").write_text(cls + "\n")
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
    if driver:
        (base / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        os.symlink(base / "drivers" / driver, d / "driver")


def test_gpu_rows_name_vendor_and_model_as_osquery_does(tmp_path: Path) -> None:
    sysfs = tmp_path / "pci"
    _device(sysfs, "0000:01:00.0", "0x030000", "0x10de", "0x2204", driver="nvidia")
    _device(sysfs, "0000:02:00.0", "0x030200", "0x10de", "0x9999")  # not in the database
    _device(sysfs, "0000:03:00.0", "0x020000", "0x8086", "0x100e")  # a NIC: not a GPU
    rows = _gpus(sysfs / "devices", PciNames((FIXTURE,)))
    assert rows == [
        {
            "pci_slot": "0000:01:00.0",
            "vendor": "NVIDIA Corporation",
            "vendor_id": "0x10de",
            "model": "GA102 [GeForce RTX 3090]",
            "model_id": "0x2204",
            "driver": "nvidia",
        },
        {
            "pci_slot": "0000:02:00.0",
            "vendor": "NVIDIA Corporation",
            "vendor_id": "0x10de",
            "model": "0x9999",  # falls back to the id
            "model_id": "0x9999",
            "driver": "",
        },
    ]
    # Without a database every name is its id.
    (row, _) = _gpus(sysfs / "devices", PciNames((tmp_path / "none",)))
    assert (row["vendor"], row["model"]) == ("0x10de", "0x2204")
