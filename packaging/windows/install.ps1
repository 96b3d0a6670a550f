<#
.SYNOPSIS
    Registers Outpost as a Scheduled Task and starts it.

.DESCRIPTION
    Without -System the task runs as the current user at logon.  With -System
    (from an elevated prompt) it runs as SYSTEM at startup.  Either way it runs
    `python -m agent run` with the interpreter Outpost was installed into.

    This is the by-hand equivalent of `outpost service install [--user]`,
    which registers the same task from agent/install/templates.py.

.EXAMPLE
    .\install.ps1 -Python "$env:LOCALAPPDATA\outpost\venv\Scripts\pythonw.exe"
.EXAMPLE
    .\install.ps1 -System -Python "C:\Program Files\Outpost\venv\Scripts\pythonw.exe"
#>
[CmdletBinding()]
param(
    [switch]$System,
    # pythonw.exe avoids a console window; Outpost then logs to a file.
    [string]$Python = ""
)
$ErrorActionPreference = "Stop"
$TaskName = "Outpost"

if (-not $Python) {
    $found = Get-Command pythonw.exe -ErrorAction SilentlyContinue
    if (-not $found) { $found = Get-Command python.exe }
    $Python = $found.Source
}
$check = Start-Process -FilePath $Python -ArgumentList @("-c", '"import agent"') -Wait -PassThru -NoNewWindow
if ($check.ExitCode -ne 0) {
    throw "Outpost is not installed for $Python; run 'pip install .' with it first."
}

if ($System) {
    # A task cannot set environment variables, so it sets OUTPOST_SYSTEM itself
    # (for the machine-wide directories) and then runs `python -m agent run`.
    $arguments = @'
-c "import os, runpy, sys; os.environ['OUTPOST_SYSTEM'] = '1'; sys.argv = ['outpost', 'run']; runpy.run_module('agent', run_name='__main__', alter_sys=True)"
'@
    $trigger = New-ScheduledTaskTrigger -AtStartup
    $principal = New-ScheduledTaskPrincipal -UserId "S-1-5-18" -LogonType ServiceAccount -RunLevel Limited
    # %ProgramData% is readable by every user: the spool and config are for SYSTEM and
    # Administrators only (by SID: account names are localised).
    $workdir = Join-Path $env:ProgramData "outpost"
    New-Item -ItemType Directory -Force $workdir | Out-Null
    icacls $workdir /inheritance:r /grant:r "*S-1-5-18:(OI)(CI)F" /grant:r "*S-1-5-32-544:(OI)(CI)F" | Out-Null
    if (-not $Python.StartsWith($env:ProgramFiles, [StringComparison]::OrdinalIgnoreCase)) {
        Write-Warning "$Python is outside Program Files: SYSTEM will run code from a directory other users may be able to change."
    }
} else {
    $arguments = "-m agent run"
    $me = [System.Security.Principal.WindowsIdentity]::GetCurrent().Name
    $trigger = New-ScheduledTaskTrigger -AtLogOn -User $me
    $principal = New-ScheduledTaskPrincipal -UserId $me -LogonType Interactive -RunLevel Limited
    $workdir = Join-Path $env:LOCALAPPDATA "outpost"
    New-Item -ItemType Directory -Force $workdir | Out-Null
}

# Task Scheduler's restart-on-failure covers only a failure to launch, not a
# process that exits non-zero.  Repeating the trigger every minute restarts a
# crashed agent; MultipleInstances IgnoreNew makes the repeats no-ops while it runs.
$trigger.Repetition = (New-ScheduledTaskTrigger -Once -At (Get-Date) -RepetitionInterval (New-TimeSpan -Minutes 1)).Repetition

$settings = New-ScheduledTaskSettingsSet `
    -MultipleInstances IgnoreNew `
    -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries `
    -StartWhenAvailable `
    -ExecutionTimeLimit ([TimeSpan]::Zero) `
    -RestartCount 999 -RestartInterval (New-TimeSpan -Minutes 1) `
    -Priority 5   # a normal process's priority; a task's default, 7, is below normal

$action = New-ScheduledTaskAction -Execute $Python -Argument $arguments.Trim() -WorkingDirectory $workdir

Stop-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger $trigger `
    -Principal $principal -Settings $settings `
    -Description "Outpost local analytics buffering agent" -Force | Out-Null
Start-ScheduledTask -TaskName $TaskName
Write-Host "Registered and started the '$TaskName' task."
