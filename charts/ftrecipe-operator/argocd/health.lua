-- Argo CD health check for ftrecipe.dev/FinetuneRecipe (argocd-cm key
-- resource.customizations.health.ftrecipe.dev_FinetuneRecipe). A recipe is a batch run: Healthy once it
-- has succeeded, Progressing while it runs, Degraded when it failed, Suspended while paused.
-- Single source: charts/ftrecipe-operator/argocd/health.lua; docs/install.md embeds it verbatim and
-- tests/test_chart.py runs it (Lua 5.1, as Argo CD's gopher-lua) against every phase.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the ftrecipe operator to pick up the recipe"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the ftrecipe operator to act on generation " .. tostring(generation)
  return hs
end
local phase = status.phase
local message = status.message
if message == nil or message == "" then
  message = phase
end
hs.message = message
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" or (obj.spec ~= nil and obj.spec.suspend == true) then
  hs.status = "Suspended"
elseif phase == "Pending" or phase == "PreparingData" or phase == "Training" or phase == "Evaluating" then
  hs.status = "Progressing"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase) .. ": " .. message
end
return hs
