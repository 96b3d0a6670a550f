<#
.SYNOPSIS
    Stops and unregisters the Outpost Scheduled Task.

.DESCRIPTION
    The by-hand equivalent of `outpost service uninstall [--user]`.  Outpost's
    config and spool are kept; see docs/operations.md for where they live.
    Removing a task registered with -System needs an elevated prompt.
#>
[CmdletBinding()]
param()
$ErrorActionPreference = "Stop"
$TaskName = "Outpost"

$task = Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
if (-not $task) {
    Write-Host "No '$TaskName' task is registered."
    exit 0
}
Stop-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false
Write-Host "Stopped and removed the '$TaskName' task."
