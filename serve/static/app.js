// The console: three views over the same service. No build step: plain ES modules.
import { call } from "./api.js";
import { setUpScore } from "./score.js";
import { setUpGenerate } from "./generate.js";
import { setUpAlerts } from "./alerts.js";

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  for (const view of document.querySelectorAll(".view")) {
    view.classList.toggle("active", view.id === `view-${name}`);
  }
  history.replaceState(null, "", `#${name}`);
}

async function showModel() {
  const info = document.getElementById("model-info");
  try {
    const model = await call("/v1/model");
    info.textContent = `model ${model.model_version} · threshold ${model.threshold.toPrecision(4)} ` +
      `· target FPR ${model.target_fpr} · ${model.device}`;
  } catch (error) {
    info.textContent = `model: ${error.message}`;
  }
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}
const start = location.hash.slice(1);
showView(["score", "generate", "alerts"].includes(start) ? start : "score");
showModel();
setUpScore();
setUpGenerate();
setUpAlerts();
