"""The data model of the simulated xenstored: nodes, permissions, transactions.

Sans-IO: every operation takes the caller's identity and validated arguments
and either returns its answer plus the watch *triggers* it caused, or raises
:class:`~virtio_diskd.ioreq.xenstore.wire.XenstoreError`.  The socket server in
:mod:`.xenstored` turns triggers into WATCH_EVENT messages.

Behaviour follows ``docs/misc/xenstore.txt`` and the C xenstored of Xen 4.17:

* permissions are a list ``[owner+default, *overrides]``; the owner and
  privileged callers (dom0) have full access, others get their override or
  the default;
* a missing node answers ENOENT, unless the caller could not read its closest
  existing ancestor, in which case EACCES (existence is not leaked);
* new nodes inherit their parent's permissions, and an unprivileged creator
  becomes their owner;
* RM of a missing node whose parent exists succeeds; RM of ``/`` is EINVAL;
* a transaction works on a private copy of the tree; at commit, if any node it
  read or wrote changed in the meantime, the commit fails with EAGAIN and
  nothing of it is applied; watches fire only when it commits.
"""

from __future__ import annotations

import errno
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from virtio_diskd.ioreq.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX, XenstoreError

READ = 1
WRITE = 2
_ACCESS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+")
_PERM = re.compile(r"([nrwb])([0-9]{1,5})")
#: Nodes an unprivileged domain may own (the C xenstored's default entry quota).
DOMAIN_NODE_QUOTA = 1000
#: Transactions one connection may hold open at once (C xenstored: 10).
MAX_TRANSACTIONS = 10


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry, ``<letter><domid>`` on the wire."""

    access: str
    domid: int

    @classmethod
    def parse(cls, text: str) -> Perm:
        match = _PERM.fullmatch(text)
        if match is None or int(match.group(2)) > 0xFFFF:
            raise XenstoreError(errno.EINVAL, f"bad permission {text!r}")
        return cls(match.group(1), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a domain, and whether it is privileged (dom0)."""

    domid: int
    privileged: bool
    #: the domain this one was made privileged over (SET_TARGET): it acts as that
    #: domain's owner on its nodes, as the C xenstored's ``conn->target``
    target: int | None = None

    @classmethod
    def domain(cls, domid: int) -> Caller:
        return cls(domid, privileged=domid == 0)


@dataclass(slots=True)
class Node:
    value: bytes
    perms: tuple[Perm, ...]
    gen: int
    children: dict[str, None] = field(default_factory=dict)

    def copy(self) -> Node:
        return Node(self.value, self.perms, self.gen, dict(self.children))


@dataclass(frozen=True, slots=True)
class Trigger:
    """A change that may fire watches.

    ``exact`` triggers match only a watch on exactly ``path`` (used for each
    descendant of a removed subtree); others match watches on ``path`` and on
    any ancestor.  ``perms`` are the node's permissions at the time, so that
    only watchers allowed to read the node hear of it.
    """

    path: str
    exact: bool
    perms: tuple[Perm, ...]


def access_of(perms: tuple[Perm, ...], caller: Caller) -> int:
    """The access bits ``caller`` has on a node with ``perms``."""
    if caller.privileged or perms[0].domid == caller.domid \
            or (caller.target is not None and perms[0].domid == caller.target):
        return READ | WRITE
    for perm in perms[1:]:
        if perm.domid == caller.domid:
            return _ACCESS[perm.access]
    return _ACCESS[perms[0].access]


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def is_child(path: str, ancestor: str) -> bool:
    """True when ``path`` is ``ancestor`` or lies below it."""
    if ancestor == "/":
        return True
    return path == ancestor or path.startswith(ancestor + "/")


def canonical_path(caller: Caller, raw: str, *, allow_special: bool = False) -> str:
    """Validate a client path and make it absolute (relative → the caller's home)."""
    if not raw or _PATH_CHARS.fullmatch(raw) is None:
        raise XenstoreError(errno.EINVAL, f"invalid path {raw!r}")
    if raw.startswith("@"):
        if not allow_special:
            raise XenstoreError(errno.EINVAL, f"special path {raw!r} not allowed here")
        return raw
    if "//" in raw or (len(raw) > 1 and raw.endswith("/")):
        raise XenstoreError(errno.EINVAL, f"invalid path {raw!r}")
    if raw.startswith("/"):
        if len(raw) > ABS_PATH_MAX:
            raise XenstoreError(errno.EINVAL, "path too long")
        return raw
    if len(raw) > REL_PATH_MAX:
        raise XenstoreError(errno.EINVAL, "relative path too long")
    return f"/local/domain/{caller.domid}/{raw}"


class NodeTree:
    """Path → node map in which every node's parent exists."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.nodes = nodes

    @classmethod
    def initial(cls) -> NodeTree:
        dom0_only = (Perm("n", 0),)
        tree = cls({"/": Node(b"", dom0_only, 0)})
        for path in ("/local", "/local/domain", "/tool"):
            tree.nodes[path] = Node(b"", dom0_only, 0)
            tree.nodes[parent_of(path)].children[path.rsplit("/", 1)[1]] = None
        return tree

    def copy(self) -> NodeTree:
        return NodeTree({path: node.copy() for path, node in self.nodes.items()})

    def subtree(self, path: str) -> Iterator[str]:
        """``path`` and every descendant, children before their parents."""
        node = self.nodes[path]
        for name in node.children:
            yield from self.subtree(path.rstrip("/") + "/" + name)
        yield path

    def owned_by(self, domid: int) -> int:
        return sum(1 for node in self.nodes.values() if node.perms[0].domid == domid)


@dataclass(slots=True)
class Transaction:
    """A transaction's private tree plus what it observed and changed."""

    owner: object
    tree: NodeTree
    observed: dict[str, int] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    triggers: list[Trigger] = field(default_factory=list)

    def observe(self, path: str) -> None:
        if path not in self.observed:
            node = self.tree.nodes.get(path)
            self.observed[path] = -1 if node is None else node.gen


class Xenstore:
    """The whole store: the committed tree, open transactions, introduced domains."""

    def __init__(self) -> None:
        self.tree = NodeTree.initial()
        self._gen = itertools.count(1)
        self._tx_ids = itertools.count(1)
        self.transactions: dict[int, Transaction] = {}
        self.introduced: set[int] = {0}
        #: SET_TARGET: domain -> the domain it is privileged over (kept until released)
        self.targets: dict[int, int] = {}

    # -- transactions -----------------------------------------------------

    def transaction_start(self, owner: object) -> int:
        if sum(1 for tx in self.transactions.values() if tx.owner is owner) >= MAX_TRANSACTIONS:
            raise XenstoreError(errno.ENOSPC, "too many open transactions")
        tx_id = next(self._tx_ids) & 0xFFFFFFFF or next(self._tx_ids)
        self.transactions[tx_id] = Transaction(owner, self.tree.copy())
        return tx_id

    def transaction_end(self, owner: object, tx_id: int, commit: bool) -> list[Trigger]:
        tx = self._transaction(owner, tx_id)
        del self.transactions[tx_id]
        if not commit:
            return []
        for path, gen in tx.observed.items():
            node = self.tree.nodes.get(path)
            if (-1 if node is None else node.gen) != gen:
                raise XenstoreError(errno.EAGAIN, f"{path} changed during the transaction")
        gen = next(self._gen)
        # Apply in path order so that parents are created before children and
        # removed after them (a removed parent's children are in `changed` too).
        for path in sorted(tx.changed, key=lambda p: (p.count("/"), p)):
            node = tx.tree.nodes.get(path)
            if node is not None:
                self.tree.nodes[path] = node.copy()
                self.tree.nodes[path].gen = gen
        for path in sorted(tx.changed, key=lambda p: -p.count("/")):
            if path not in tx.tree.nodes:
                self.tree.nodes.pop(path, None)
        return tx.triggers

    def abort_all(self, owner: object) -> None:
        """Drop every transaction of a vanished connection (nothing is applied)."""
        for tx_id in [t for t, tx in self.transactions.items() if tx.owner is owner]:
            del self.transactions[tx_id]

    def _transaction(self, owner: object, tx_id: int) -> Transaction:
        tx = self.transactions.get(tx_id)
        if tx is None or tx.owner is not owner:
            raise XenstoreError(errno.ENOENT, f"no transaction {tx_id}")
        return tx

    def _view(self, owner: object, tx_id: int) -> tuple[NodeTree, Transaction | None]:
        if tx_id == 0:
            return self.tree, None
        tx = self._transaction(owner, tx_id)
        return tx.tree, tx

    # -- lookups ------------------------------------------------------------

    @staticmethod
    def _missing_error(tree: NodeTree, caller: Caller, path: str) -> XenstoreError:
        ancestor = parent_of(path)
        while ancestor not in tree.nodes:
            ancestor = parent_of(ancestor)
        if not access_of(tree.nodes[ancestor].perms, caller) & READ:
            return XenstoreError(errno.EACCES, path)
        return XenstoreError(errno.ENOENT, path)

    def _get(self, tree: NodeTree, tx: Transaction | None, caller: Caller, path: str,
             need: int) -> Node:
        if tx is not None:
            tx.observe(path)
        node = tree.nodes.get(path)
        if node is None:
            raise self._missing_error(tree, caller, path)
        if access_of(node.perms, caller) & need != need:
            raise XenstoreError(errno.EACCES, path)
        return node

    def read(self, owner: object, tx_id: int, caller: Caller, path: str) -> bytes:
        tree, tx = self._view(owner, tx_id)
        return self._get(tree, tx, caller, path, READ).value

    def directory(self, owner: object, tx_id: int, caller: Caller, path: str) -> list[str]:
        tree, tx = self._view(owner, tx_id)
        return list(self._get(tree, tx, caller, path, READ).children)

    def generation(self, owner: object, tx_id: int, path: str) -> int:
        tree, _ = self._view(owner, tx_id)
        return tree.nodes[path].gen

    def get_perms(self, owner: object, tx_id: int, caller: Caller, path: str) -> tuple[Perm, ...]:
        tree, tx = self._view(owner, tx_id)
        return self._get(tree, tx, caller, path, READ).perms

    # -- changes ------------------------------------------------------------

    def _touch(self, tree: NodeTree, tx: Transaction | None, path: str) -> int:
        """Record a change of ``path``; returns the generation to stamp on it."""
        if tx is None:
            return next(self._gen)
        tx.observe(path)
        tx.changed.add(path)
        return tree.nodes[path].gen if path in tree.nodes else 0

    def _emit(self, tx: Transaction | None, triggers: list[Trigger]) -> list[Trigger]:
        if tx is None:
            return triggers
        tx.triggers.extend(triggers)
        return []

    def _create(self, tree: NodeTree, tx: Transaction | None, caller: Caller, path: str,
                value: bytes) -> None:
        missing = [path]
        while parent_of(missing[-1]) not in tree.nodes:
            missing.append(parent_of(missing[-1]))
        ancestor = parent_of(missing[-1])
        if tx is not None:
            tx.observe(ancestor)
            for p in missing:
                tx.observe(p)
        parent = tree.nodes[ancestor]
        if not access_of(parent.perms, caller) & WRITE:
            raise XenstoreError(errno.EACCES, path)
        if not caller.privileged and tree.owned_by(caller.domid) + len(missing) > DOMAIN_NODE_QUOTA:
            raise XenstoreError(errno.ENOSPC, f"domain {caller.domid} is over its node quota")
        perms = parent.perms
        if not caller.privileged:
            perms = (Perm(perms[0].access, caller.domid), *perms[1:])
        for p in reversed(missing):
            gen = self._touch(tree, tx, p)
            tree.nodes[p] = Node(value if p == path else b"", perms, gen)
            parent_path = parent_of(p)
            tree.nodes[parent_path].children[p.rsplit("/", 1)[1]] = None
            tree.nodes[parent_path].gen = self._touch(tree, tx, parent_path)

    def write(self, owner: object, tx_id: int, caller: Caller, path: str,
              value: bytes) -> list[Trigger]:
        tree, tx = self._view(owner, tx_id)
        if tx is not None:
            tx.observe(path)
        node = tree.nodes.get(path)
        if node is None:
            self._create(tree, tx, caller, path, value)
        else:
            if not access_of(node.perms, caller) & WRITE:
                raise XenstoreError(errno.EACCES, path)
            node.value = value
            node.gen = self._touch(tree, tx, path)
        return self._emit(tx, [Trigger(path, False, tree.nodes[path].perms)])

    def mkdir(self, owner: object, tx_id: int, caller: Caller, path: str) -> list[Trigger]:
        tree, tx = self._view(owner, tx_id)
        if tx is not None:
            tx.observe(path)
        node = tree.nodes.get(path)
        if node is not None:
            if not access_of(node.perms, caller) & WRITE:
                raise XenstoreError(errno.EACCES, path)
            return []
        self._create(tree, tx, caller, path, b"")
        return self._emit(tx, [Trigger(path, False, tree.nodes[path].perms)])

    def rm(self, owner: object, tx_id: int, caller: Caller, path: str) -> list[Trigger]:
        tree, tx = self._view(owner, tx_id)
        if path == "/":
            raise XenstoreError(errno.EINVAL, "cannot remove /")
        if tx is not None:
            tx.observe(path)
        node = tree.nodes.get(path)
        if node is None:
            if parent_of(path) in tree.nodes:
                return []
            raise self._missing_error(tree, caller, path)
        if not access_of(node.perms, caller) & WRITE:
            raise XenstoreError(errno.EACCES, path)
        triggers = []
        for p in list(tree.subtree(path)):
            self._touch(tree, tx, p)
            removed = tree.nodes.pop(p)
            if p != path:
                triggers.append(Trigger(p, True, removed.perms))
        triggers.append(Trigger(path, False, node.perms))
        parent_path = parent_of(path)
        del tree.nodes[parent_path].children[path.rsplit("/", 1)[1]]
        tree.nodes[parent_path].gen = self._touch(tree, tx, parent_path)
        return self._emit(tx, triggers)

    def set_perms(self, owner: object, tx_id: int, caller: Caller, path: str,
                  perms: tuple[Perm, ...]) -> list[Trigger]:
        tree, tx = self._view(owner, tx_id)
        if not perms:
            raise XenstoreError(errno.EINVAL, "empty permission list")
        node = self._get(tree, tx, caller, path, 0)
        if not caller.privileged:
            if node.perms[0].domid != caller.domid:
                raise XenstoreError(errno.EACCES, path)
            if perms[0].domid != caller.domid:
                raise XenstoreError(errno.EPERM, "an unprivileged domain cannot give a node away")
        old = node.perms
        node.perms = perms
        node.gen = self._touch(tree, tx, path)
        # Watchers that could read the node before or after the change hear of it.
        return self._emit(tx, [Trigger(path, False, old), Trigger(path, False, perms)])

    # -- domains --------------------------------------------------------------

    def introduce(self, caller: Caller, domid: int) -> list[Trigger]:
        if not caller.privileged:
            raise XenstoreError(errno.EACCES, "INTRODUCE needs privilege")
        self.introduced.add(domid)
        return [Trigger("@introduceDomain", False, (Perm("n", 0),))]

    def release(self, caller: Caller, domid: int) -> list[Trigger]:
        if not caller.privileged:
            raise XenstoreError(errno.EACCES, "RELEASE needs privilege")
        if domid == 0:
            raise XenstoreError(errno.EINVAL, "dom0 cannot be released")
        if domid not in self.introduced:
            raise XenstoreError(errno.ENOENT, f"domain {domid} is not introduced")
        self.introduced.discard(domid)
        self.targets.pop(domid, None)
        return [Trigger("@releaseDomain", False, (Perm("n", 0),))]
