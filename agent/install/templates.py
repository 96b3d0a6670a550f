"""The canonical service definitions: systemd units, launchd plists, the Windows task.

These are string constants rather than files under ``packaging/`` because an
installed wheel has no ``packaging/`` directory.  The files there are these
templates rendered for ``/usr/bin/python3``; a test keeps them identical.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from agent.terminal import systemd_word

TASK_NAME = "Outpost"
AGENT_LABEL = "sh.outpost.agent"
DAEMON_LABEL = "sh.outpost.daemon"
SERVICE_USER = "outpost"

# A Scheduled Task cannot set environment variables, so the SYSTEM task sets
# OUTPOST_SYSTEM itself (making agent.paths pick the machine-wide directories)
# and then runs exactly what `python -m agent run` runs.
SYSTEM_TASK_ARGUMENTS = (
    "-c \"import os, runpy, sys; os.environ['OUTPOST_SYSTEM'] = '1'; "
    "sys.argv = ['outpost', 'run']; runpy.run_module('agent', run_name='__main__', alter_sys=True)\""
)
USER_TASK_ARGUMENTS = "-m agent run"

# The [Service] lines both units share.
SYSTEMD_SERVICE_COMMON = """\
Type=notify
NotifyAccess=main
ExecStart={exec_start}
# Validate first: a bad config makes `systemctl reload` fail (and say why) instead of
# reporting success while the agent refuses it and keeps the running config.
ExecReload={exec_reload}
# journalctl -t outpost; without it the lines are tagged python3.
SyslogIdentifier=outpost
Restart=on-failure
# Exit 2 is a config or environment mistake (one line in the journal): a restart cannot
# fix it, so the unit shows failed until the operator does and restarts it.
RestartPreventExitStatus=2
RestartSec=2
WatchdogSec=30
# Long enough for a graceful drain of in-flight batches.
TimeoutStopSec=30
# Open files: listen.max_connections (1024) client connections, the listen backlog
# and the spool; with less the agent lowers its connection cap to fit, and says so.
LimitNOFILE=8192
"""

SYSTEMD_SYSTEM_UNIT = """\
# Outpost as a system service.  `outpost service install` writes this file
# with the interpreter it runs under; this copy is rendered for {python}.
[Unit]
Description=Outpost local analytics buffering agent
After=network.target

[Service]
{service_common}User=outpost
Group=outpost
Environment=OUTPOST_SYSTEM=1
# The spool holds user data: /var/lib/outpost, private to the service user.
StateDirectory=outpost
StateDirectoryMode=0700
# systemd keeps /etc/outpost owned by root (unlike StateDirectory), so 0700
# would lock the outpost user out of its own config.  The directory listing is
# not secret; agent.toml is, so install it as 0640 root:outpost.
ConfigurationDirectory=outpost
ConfigurationDirectoryMode=0755
UMask=0077
NoNewPrivileges=true
CapabilityBoundingSet=
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
PrivateDevices=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
# Other processes are invisible, and /proc shows only them: agent/device.py reads
# the RAM size with sysconf when /proc/meminfo is hidden.
ProtectProc=invisible
ProcSubset=pid
RemoveIPC=yes
PrivateUsers=yes
# AF_NETLINK: the kernel's network-change notifications (agent/netwatch.py).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
# MemoryDenyWriteExecute stays off: ctypes/cffi callbacks on libffi builds
# without static trampolines, `-X perf` and CPython's JIT all need W+X pages.
# The unit runs whatever interpreter Outpost was installed into, and a denial
# shows up as a crash at some later call rather than at start-up.
MemoryDenyWriteExecute=false
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

SYSTEMD_USER_UNIT = """\
# Outpost as a user service (systemctl --user).  `outpost service install --user`
# writes this file with the interpreter it runs under; this copy is rendered
# for {python}.
[Unit]
Description=Outpost local analytics buffering agent

[Service]
{service_common}# The user manager would start us in $HOME, where a stray ./agent.toml would
# win over the user config directory.
WorkingDirectory=/
UMask=0077
# Only seccomp-based hardening here: the namespace-based options of the system
# unit need unprivileged user namespaces in a user manager and fail to start
# where those are disabled.
NoNewPrivileges=true
# AF_NETLINK: the kernel's network-change notifications (agent/netwatch.py).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=default.target
"""

LAUNCHD_PLIST = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Outpost as a launchd {kind}.  `outpost service install` writes this file
     with the interpreter it runs under; this copy is rendered for {python}. -->
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>{label}</string>
	<key>ProgramArguments</key>
	<array>
		<string>{python}</string>
		<string>-m</string>
		<string>agent</string>
		<string>run</string>
	</array>
{extra}	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ExitTimeOut</key>
	<integer>30</integer>
	<key>Umask</key>
	<integer>63</integer>
	<key>StandardOutPath</key>
	<string>{log_dir}/outpost.log</string>
	<key>StandardErrorPath</key>
	<string>{log_dir}/outpost.log</string>
</dict>
</plist>
"""

LAUNCHD_DAEMON_EXTRA = """\
	<key>UserName</key>
	<string>outpost</string>
	<key>GroupName</key>
	<string>outpost</string>
	<key>EnvironmentVariables</key>
	<dict>
		<key>OUTPOST_SYSTEM</key>
		<string>1</string>
	</dict>
"""

# Task Scheduler counts only a failure to *launch* as a failure, not a process
# that exits non-zero, so RestartOnFailure alone would leave a crashed agent
# dead.  The trigger also repeats every minute; IgnoreNew makes each repeat a
# no-op while the agent is running.
TASK_XML = """\
<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>Outpost local analytics buffering agent</Description>
    <URI>\\{task}</URI>
  </RegistrationInfo>
  <Triggers>
    <{trigger}>
{trigger_user}      <Repetition>
        <Interval>PT1M</Interval>
        <StopAtDurationEnd>false</StopAtDurationEnd>
      </Repetition>
      <Enabled>true</Enabled>
    </{trigger}>
  </Triggers>
  <Principals>
    <Principal id="Author">
{principal}      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <StartWhenAvailable>true</StartWhenAvailable>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <!-- 7 (below normal) is Task Scheduler's default; 5 is a normal process's. -->
    <Priority>5</Priority>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>999</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{command}</Command>
      <Arguments>{arguments}</Arguments>
      <WorkingDirectory>{workdir}</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


def systemd_unit(python: str, *, system: bool) -> str:
    """The systemd unit running ``python -m agent run``."""
    template = SYSTEMD_SYSTEM_UNIT if system else SYSTEMD_USER_UNIT
    exec_start = f"{systemd_word(python, variables=True)} -m agent run"
    exec_reload = f"{systemd_word(python, variables=True)} -m agent check-config --reload $MAINPID"
    common = SYSTEMD_SERVICE_COMMON.format(exec_start=exec_start, exec_reload=exec_reload)
    return template.format(python=python, exec_start=exec_start, service_common=common)


def launchd_plist(python: str, *, system: bool, log_dir: str) -> str:
    """The LaunchDaemon (system) or LaunchAgent (user) property list."""
    return LAUNCHD_PLIST.format(
        kind="daemon" if system else "agent",
        label=DAEMON_LABEL if system else AGENT_LABEL,
        python=escape(python),
        extra=LAUNCHD_DAEMON_EXTRA if system else "",
        log_dir=escape(log_dir),
    )


def task_xml(python: str, *, system: bool, user: str) -> str:
    """The Scheduled Task: at startup as SYSTEM, or at ``user``'s logon as that user."""
    if system:
        trigger, trigger_user = "BootTrigger", ""
        principal = "      <UserId>S-1-5-18</UserId>\n"
        arguments = SYSTEM_TASK_ARGUMENTS
    else:
        trigger = "LogonTrigger"
        trigger_user = f"      <UserId>{escape(user)}</UserId>\n"
        principal = f"      <UserId>{escape(user)}</UserId>\n      <LogonType>InteractiveToken</LogonType>\n"
        arguments = USER_TASK_ARGUMENTS
    return TASK_XML.format(
        task=TASK_NAME,
        trigger=trigger,
        trigger_user=trigger_user,
        principal=principal,
        command=escape(python),
        arguments=escape(arguments),
        # The agent's own data directory: a stray agent.toml elsewhere cannot be picked up.
        workdir=r"%ProgramData%\outpost" if system else r"%LOCALAPPDATA%\outpost",
    )


def icacls_argv(directory: str) -> tuple[str, ...]:
    """Windows: ``directory`` for SYSTEM and Administrators only (by SID: names are localised)."""
    return ("icacls", directory, "/inheritance:r",
            "/grant:r", "*S-1-5-18:(OI)(CI)F", "/grant:r", "*S-1-5-32-544:(OI)(CI)F")


def useradd_argv(name: str) -> tuple[str, ...]:
    """Linux: the service account; its home is the StateDirectory, which systemd creates."""
    return ("useradd", "--system", "--user-group", "--no-create-home",
            "--home-dir", "/var/lib/outpost", "--shell", "/usr/sbin/nologin", name)


def dscl_argvs(name: str, uid: int | str) -> list[tuple[str, ...]]:
    """macOS: a hidden service account and its group, both with id ``uid``."""
    user = f"/Users/{name}"
    return [
        ("dscl", ".", "-create", f"/Groups/{name}", "PrimaryGroupID", str(uid)),
        ("dscl", ".", "-create", user, "UniqueID", str(uid)),
        ("dscl", ".", "-create", user, "PrimaryGroupID", str(uid)),
        ("dscl", ".", "-create", user, "UserShell", "/usr/bin/false"),
        ("dscl", ".", "-create", user, "NFSHomeDirectory", "/var/empty"),
        ("dscl", ".", "-create", user, "IsHidden", "1"),
    ]
