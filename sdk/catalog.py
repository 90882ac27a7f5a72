"""Which services exist and what the SDK calls them, read from the descriptors.

A proto package ``autoecoops.<domain>.v1`` with one service becomes the
client attribute ``<domain>`` (``client.memory``); a package with several
services names each ``<domain>_<service>`` (the service name in snake_case
without its ``Service`` suffix). RPCs become snake_case methods
(``GetOpenIdConfiguration`` -> ``get_open_id_configuration``). The runtime
and the typing stub generator both use these rules, so they always agree.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from collections.abc import Iterator

from google.protobuf import descriptor

ROOT = "autoecoops"
VERSION = "v1"
_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake(name: str) -> str:
    """``GetOpenIdConfiguration`` -> ``get_open_id_configuration``."""
    return _WORD.sub("_", name).lower()


def package_of(domain: str) -> str:
    """The proto package of a domain: ``autoecoops.<domain>.v1``."""
    return f"{ROOT}.{domain}.{VERSION}"


def _import_package(package: str) -> None:
    """Import a generated package's ``_pb2`` modules, so its descriptors are loaded."""
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{info.name}")


def services_in(package: str) -> list[descriptor.ServiceDescriptor]:
    """Every service of proto package ``package`` that this process has loaded.

    The generated package is imported first; services compiled at run time
    (any ``_pb2`` module already imported) count too.
    """
    _import_package(package)
    found: dict[str, descriptor.ServiceDescriptor] = {}
    for name, module in list(sys.modules.items()):
        if not name.endswith("_pb2"):
            continue
        # __dict__, not getattr: no module __getattr__ hook may run here.
        file = getattr(module, "__dict__", {}).get("DESCRIPTOR")
        if isinstance(file, descriptor.FileDescriptor) and file.package == package:
            for svc in file.services_by_name.values():
                found[svc.full_name] = svc
    return [found[name] for name in sorted(found)]


def attribute(service: descriptor.ServiceDescriptor, siblings: int) -> str:
    """The client attribute of ``service``, one of ``siblings`` in its package."""
    domain = service.full_name.split(".")[1]
    if siblings == 1:
        return domain
    return f"{domain}_{snake(service.name.removesuffix('Service'))}"


def find(name: str) -> descriptor.ServiceDescriptor | None:
    """The service that client attribute ``name`` stands for, if any."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    # A domain may contain underscores itself: try the longest prefix first.
    cuts = [len(name)] + [i for i in range(len(name) - 1, 0, -1) if name[i] == "_"]
    for cut in cuts:
        services = services_in(package_of(name[:cut]))
        for svc in services:
            if attribute(svc, len(services)) == name:
                return svc
    return None


def domains() -> Iterator[str]:
    """The domains whose generated packages ship with this install."""
    root = importlib.import_module(ROOT)
    for info in pkgutil.iter_modules(root.__path__):
        if info.ispkg and services_in(package_of(info.name)):
            yield info.name


def all_services() -> list[tuple[str, descriptor.ServiceDescriptor]]:
    """(attribute, service) for every generated service, by attribute."""
    out: list[tuple[str, descriptor.ServiceDescriptor]] = []
    for domain in domains():
        services = services_in(package_of(domain))
        out += [(attribute(s, len(services)), s) for s in services]
    return sorted(out, key=lambda pair: pair[0])


def class_name(service: descriptor.ServiceDescriptor, asynchronous: bool) -> str:
    """The sub-client class of ``service``: ``MemoryServiceClient`` / ``AsyncMemoryServiceClient``."""
    return f"{'Async' if asynchronous else ''}{service.name}Client"
