"""Real daemons on one machine for the `cluster` tests: SLURM with two slurmd (two node names
for this host; the scale rehearsal asks for four), sshd for DeepSpeed's pdsh path, and Open MPI -
installed with apt when missing, started and stopped by PID, never left running.

``Slurm()`` / ``Sshd()`` return a handle or raise ``Unavailable(reason)``; the fixtures turn
that into a skip that states the reason (no root, no apt, a daemon that would not start).
SLURM's config, state and daemon logs stay in /tmp/mom-slurm-* for a post-mortem; sshd's
directory (keys) is removed. Nothing here is used by the default test suite.

Facts this relies on (measured on Debian 12, 2 cores, no systemd): SLURM 22.05 runs two nodes on
one host when both NodeName lines share NodeHostname/NodeAddr and have their own Port, and the
second name resolves (/etc/hosts); a requeued job waits ~120 s unless its StartTime is reset;
`scancel --batch --signal=USR1` signals only the batch shell. Each ``Slurm`` runs its own munged on
its own socket (slurm.conf ``AuthInfo=socket=...``): harnesses running side by side (the cluster
tests and the scale rehearsal) never stop each other's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


class Unavailable(RuntimeError):
    pass


def sh(cmd, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise Unavailable(f"`{cmd if isinstance(cmd, str) else ' '.join(cmd)}` exited {p.returncode}: "
                          f"{(p.stderr or p.stdout).strip()[-500:]}")
    return p


def apt_install(binaries: dict[str, str]) -> None:
    """Install the Debian packages whose binaries are missing ({binary: package})."""
    missing = sorted({pkg for binary, pkg in binaries.items() if not shutil.which(binary)
                      and not os.path.exists(binary)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"needs root to install {', '.join(missing)} with apt")
    if not shutil.which("apt-get"):
        raise Unavailable(f"no apt-get to install {', '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run("apt-get update -q", shell=True, capture_output=True, text=True, timeout=300, env=env)
    p = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       capture_output=True, text=True, timeout=600, env=env)
    if p.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(missing)} failed: {(p.stderr or p.stdout).strip()[-400:]}")


def _wait_pidfile(path: str, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            time.sleep(0.2)
    raise Unavailable(f"no live pid in {path} after {timeout:.0f} s")


def _stop_pid(pid: int, timeout: float = 20) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class HostAlias:
    """A second name for this machine in /etc/hosts (removed again if we added it)."""

    def __init__(self, name: str):
        self.name, self.added = name, False
        try:
            socket.gethostbyname(name)
            return
        except OSError:
            pass
        if os.geteuid() != 0:
            raise Unavailable(f"host name {name} does not resolve and /etc/hosts is not writable")
        self.line = f"127.0.0.1 {name}  # mom_dist cluster tests\n"
        with open("/etc/hosts", "a") as f:
            f.write(self.line)
        self.added = True

    def remove(self) -> None:
        if self.added:  # only our own line: another harness's alias may be in use meanwhile
            with open("/etc/hosts") as f:
                lines = [x for x in f if x != self.line]
            with open("/etc/hosts", "w") as f:
                f.writelines(lines)


# ---------------------------------------------------------------------------- SLURM
SLURM_CONF = """\
ClusterName=momtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
KillWait=30
MinJobAge=600
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=defer_batch=0
{node_lines}
PartitionName=low Nodes={node_list} Default=YES OverSubscribe=YES PriorityTier=1 MaxTime=INFINITE State=UP
PartitionName=high Nodes={node_list} PriorityTier=2 MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=8000"


class Slurm:
    """slurmctld + ``nodes`` slurmd + munged, all ours. The nodes are this host and
    ``<alias>2``, ``<alias>3``, ... (names added to /etc/hosts); ``cpus`` per node (the
    partition oversubscribes, so more tasks than real cores may share them). The cluster tests
    use the default 2 nodes; the scale rehearsal (benchmarks/scale_rehearsal.py) 4 x 8 under
    its own alias, so a rehearsal and the tests can run side by side."""

    def __init__(self, nodes: int = 2, cpus: int = 4, alias: str = "momnode"):
        apt_install({"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
                     "munged": "munge", "/usr/sbin/munged": "munge"})
        self.host = socket.gethostname().split(".")[0]
        self.node2 = f"{alias}2"
        self.nodes = [self.host] + [f"{alias}{i}" for i in range(2, nodes + 1)]
        self.cpus = cpus
        self.dir = tempfile.mkdtemp(prefix="mom-slurm-")
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.pids: list[int] = []
        self.munge_pid = None
        self.aliases: list[HostAlias] = []
        try:
            for n in self.nodes[1:]:
                self.aliases.append(HostAlias(n))
            self._start()
        except BaseException:
            self.stop()
            raise

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": self.conf}

    def _start_munge(self) -> None:
        """A munged of our own, on its own socket (slurm.conf's AuthInfo names it): a shared
        /run/munge one would be stopped under us by whichever harness started it (the cluster
        tests and the scale rehearsal run side by side)."""
        for d in ("/etc/munge",):
            os.makedirs(d, exist_ok=True)
        key = "/etc/munge/munge.key"
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
        self.munge_dir = tempfile.mkdtemp(prefix="mom-munge-")  # munged refuses a socket dir it cannot own
        sh(f"chown munge:munge /etc/munge /etc/munge/munge.key {self.munge_dir} && chmod 400 /etc/munge/munge.key "
           f"&& chmod 755 {self.munge_dir}")
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        pidfile = os.path.join(self.munge_dir, "munged.pid")
        sh(["su", "-s", "/bin/sh", "munge", "-c",
            f"/usr/sbin/munged --socket={self.munge_socket} --pid-file={pidfile} "
            f"--log-file={self.munge_dir}/munged.log --seed-file={self.munge_dir}/munged.seed"])
        self.munge_pid = _wait_pidfile(pidfile)
        sh(f"munge -n --socket={self.munge_socket} | unmunge --socket={self.munge_socket}")

    def _start(self) -> None:
        self._start_munge()
        os.makedirs(os.path.join(self.dir, "state"))
        for n in self.nodes:
            os.makedirs(os.path.join(self.dir, "spool", n))
        ports = [_free_port() for _ in range(len(self.nodes) + 1)]
        node_lines = "\n".join(NODE_LINE.format(name=n, host=self.host, port=port, cpus=self.cpus)
                               for n, port in zip(self.nodes, ports[1:]))
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(host=self.host, d=self.dir, ctld_port=ports[0], node_lines=node_lines,
                                      node_list=",".join(self.nodes), munge_socket=self.munge_socket))
        sh(["slurmctld", "-c", "-f", self.conf])
        self.pids.append(_wait_pidfile(os.path.join(self.dir, "slurmctld.pid")))
        for n in self.nodes:
            sh(["slurmd", "-f", self.conf, "-N", n])
            self.pids.append(_wait_pidfile(os.path.join(self.dir, f"slurmd-{n}.pid")))
        env = dict(os.environ, **self.env)
        probe = ["srun", f"-N{len(self.nodes)}", f"-n{len(self.nodes)}", "-t1", "true"]
        for _ in range(15):
            if subprocess.run(["timeout", "30", *probe], env=env, capture_output=True).returncode == 0:
                return
            time.sleep(2)
        raise Unavailable(f"SLURM started but `{' '.join(probe)}` never succeeded; see " + self.dir)

    def run(self, cmd, timeout=60, check=True, **kw):
        return sh(cmd, timeout=timeout, check=check, env=dict(os.environ, **self.env), **kw)

    def job(self, job_id: str) -> dict:
        p = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        fields = {}
        for item in p.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout: float, release: bool = True) -> dict:
        """Wait until the job is in one of ``states``; a requeued PENDING job is released after 5 s
        (SLURM otherwise holds it ~120 s; released at once, it can start while slurmd still
        cleans up its previous run and fail with "Job credential revoked")."""
        deadline, pending_since, released = time.time() + timeout, {}, set()
        while time.time() < deadline:
            info = self.job(job_id)
            state, restarts = info.get("JobState"), info.get("Restarts", "0")
            if state in states:
                return info
            if release and state == "PENDING" and restarts != "0" and restarts not in released:
                pending_since.setdefault(restarts, time.time())
                if time.time() - pending_since[restarts] >= 5:
                    self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=False)
                    released.add(restarts)
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f} s: {self.job(job_id)}")

    def stop(self) -> None:
        env = dict(os.environ, **self.env)
        if self.pids:
            subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
            deadline = time.time() + 30  # let the cancelled steps end while their slurmd still listens
            while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                            text=True, timeout=30).stdout.strip():
                time.sleep(0.5)
            time.sleep(1)
            subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
            for pid in self.pids:
                _stop_pid(pid)
            self.pids = []
            for pid in self._our_stepds():  # a step daemon that outlived its slurmd (interrupted job)
                _stop_pid(pid, timeout=5)
        if self.munge_pid:
            _stop_pid(self.munge_pid)
            self.munge_pid = None
        if getattr(self, "munge_dir", None):
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None
        for alias in self.aliases:
            alias.remove()
        self.aliases = []


    def _our_stepds(self) -> list[int]:
        """PIDs left by this cluster's jobs when its daemons could not end them (a lost munged):
        slurmstepd processes working in or logging to its directory, batch scripts run from its
        spool, and everything under those."""
        roots, parent = set(), {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                if self.dir + "/" in cmd:
                    roots.add(int(pid))
                elif open(f"/proc/{pid}/comm").read().strip() == "slurmstepd" and (
                        os.readlink(f"/proc/{pid}/cwd") == self.dir or any(
                            os.readlink(f"/proc/{pid}/fd/{fd}").startswith(self.dir + "/")
                            for fd in os.listdir(f"/proc/{pid}/fd"))):
                    roots.add(int(pid))
            except (OSError, ValueError, IndexError):
                continue
        found, grew = set(roots), True
        while grew:
            below = {p for p, pp in parent.items() if pp in found} - found
            found |= below
            grew = bool(below)
        return sorted(found - {os.getpid()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- sshd (+ pdsh)
class Sshd:
    """An sshd of ours on a free port, with a key for root; hosts ``localhost`` and this host's
    name both reach it (two "nodes" for DeepSpeed's pdsh launcher)."""

    def __init__(self):
        apt_install({"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client", "pdsh": "pdsh"})
        if os.geteuid() != 0:
            raise Unavailable("sshd tests need root (they start sshd and authorise a key for this user)")
        self.dir = tempfile.mkdtemp(prefix="mom-sshd-")
        self.port = _free_port()
        self.pid = None
        self.home_ssh = os.path.expanduser("~/.ssh")
        os.makedirs(self.home_ssh, mode=0o700, exist_ok=True)
        self.key = os.path.join(self.dir, "id_ed25519")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key, "-C", "mom_dist cluster tests"])
        self.pub = open(self.key + ".pub").read().strip()
        self.auth = os.path.join(self.home_ssh, "authorized_keys")
        with open(self.auth, "a") as f:
            f.write(self.pub + "\n")
        os.chmod(self.auth, 0o600)
        host_key = os.path.join(self.dir, "host_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key])
        os.makedirs("/run/sshd", exist_ok=True)
        pidfile = os.path.join(self.dir, "sshd.pid")
        try:
            sh(["/usr/sbin/sshd", "-p", str(self.port), "-h", host_key, "-o", f"PidFile={pidfile}",
                "-o", "PermitRootLogin=prohibit-password", "-o", "StrictModes=no", "-o", "UsePAM=no"])
            self.pid = _wait_pidfile(pidfile)
        except BaseException:
            self.stop()
            raise
        # Client side: the key, this port, no host key prompts - for ssh and pdsh (ssh config).
        self.ssh_config = os.path.join(self.home_ssh, "config")
        self.config_block = (f"\n# mom_dist cluster tests\nHost localhost {socket.gethostname()}\n"
                             f"  Port {self.port}\n  IdentityFile {self.key}\n  StrictHostKeyChecking no\n"
                             f"  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n# end mom_dist cluster tests\n")
        with open(self.ssh_config, "a") as f:
            f.write(self.config_block)
        for host in ("localhost", socket.gethostname()):
            if sh(["ssh", host, "true"], check=False, timeout=30).returncode != 0:
                self.stop()
                raise Unavailable(f"sshd started but `ssh {host} true` fails")

    def stop(self) -> None:
        if self.pid:
            _stop_pid(self.pid)
            self.pid = None
        for path, text in ((getattr(self, "auth", None), getattr(self, "pub", None)),):
            if path and text and os.path.exists(path):
                with open(path) as f:
                    lines = [x for x in f if x.strip() != text]
                with open(path, "w") as f:
                    f.writelines(lines)
        cfg = getattr(self, "ssh_config", None)
        if cfg and os.path.exists(cfg):
            text = open(cfg).read().replace(self.config_block, "")
            with open(cfg, "w") as f:
                f.write(text)
        shutil.rmtree(self.dir, ignore_errors=True)  # our private key and host key
