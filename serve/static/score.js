// Score view: image files of any format and size in; per file the image, the 28 x 28 image the
// model saw (the bundle's preprocessing of it, done by the service), the reconstruction and
// heatmap, the verdict, score and p-value, one card per file, from one /v1/explain call.
import { call, details, element, figure, isImageFile, pngSource } from "./api.js";

function originalFigure(file) {
  // As uploaded, scaled to fit; a format the browser cannot show (TIFF) gets a note instead.
  const image = element("img", { src: URL.createObjectURL(file), alt: "uploaded", class: "original" });
  const caption = element("figcaption", {}, "uploaded");
  image.addEventListener("error", () => {
    image.replaceWith(element("span", { class: "no-preview" }, "no preview"));
  });
  return element("figure", {}, image, caption);
}

function resultCard(file, result) {
  const verdict = result.anomaly ? "anomaly" : "normal";
  return element(
    "article",
    { class: `card result-card ${verdict}`, "data-name": file.name },
    element("div", { class: "pictures" },
      originalFigure(file),
      figure(pngSource(result.input_png), "model input", "model-input"),
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
  const images = [...files].filter(isImageFile);
  if (!images.length) {
    status.textContent = "no image files among those";
    return;
  }
  const form = new FormData();
  for (const file of images) form.append("images", file, file.name);
  status.textContent = `scoring ${images.length} image(s)…`;
  try {
    const answer = await call("/v1/explain", { method: "POST", body: form });
    results.replaceChildren(...answer.results.map((result, i) => resultCard(images[i], result)));
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
