// Score view: PNG files in; score, p-value, verdict, reconstruction and heatmap out, one card
// per file, from one /v1/explain call.
import { call, details, element, figure, pngSource } from "./api.js";

function resultCard(file, result) {
  const verdict = result.anomaly ? "anomaly" : "normal";
  return element(
    "article",
    { class: `card result-card ${verdict}`, "data-name": file.name },
    element("div", { class: "pictures" },
      figure(URL.createObjectURL(file), "image", "input"),
      figure(pngSource(result.reconstruction_png), "reconstruction", "reconstruction"),
      figure(pngSource(result.heatmap_png), "anomaly map", "heatmap")),
    element("p", {}, element("span", { class: `verdict ${verdict}` }, verdict), " ", file.name),
    details([
      ["score", result.score.toPrecision(5)],
      ["p-value", result.p_value.toPrecision(3)],
      ["recon. NLL", result.reconstruction_nll.toPrecision(5)],
    ]),
  );
}

async function scoreFiles(files) {
  const status = document.getElementById("score-status");
  const results = document.getElementById("score-results");
  const pngs = [...files].filter((file) => file.type === "image/png" || file.name.endsWith(".png"));
  if (!pngs.length) {
    status.textContent = "no PNG files among those";
    return;
  }
  const form = new FormData();
  for (const file of pngs) form.append("images", file, file.name);
  status.textContent = `scoring ${pngs.length} image(s)…`;
  try {
    const answer = await call("/v1/explain", { method: "POST", body: form });
    results.replaceChildren(...answer.results.map((result, i) => resultCard(pngs[i], result)));
    const flagged = answer.results.filter((result) => result.anomaly).length;
    status.textContent = `${answer.results.length} scored by model ${answer.model_version}: ` +
      `${flagged} anomal${flagged === 1 ? "y" : "ies"} (threshold ${answer.threshold.toPrecision(4)})`;
  } catch (error) {
    status.textContent = `could not score: ${error.message}`;
  }
}

export function setUpScore() {
  const zone = document.getElementById("drop-zone");
  const input = document.getElementById("score-files");
  input.addEventListener("change", () => scoreFiles(input.files));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    scoreFiles(event.dataTransfer.files);
  });
}
