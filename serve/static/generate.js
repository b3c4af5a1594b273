// Generate view: sample grids from the model's fitted latent density (a seed, and "More" for
// the next seed), and a latent interpolation between two images or two seeds, walked with a slider.
import { call, element, modelInputs, pngSource } from "./api.js";

let nextSeed = 0;

async function drawSamples({ append }) {
  const seedInput = document.getElementById("sample-seed");
  const grids = document.getElementById("sample-grids");
  const seed = append ? nextSeed : Number(seedInput.value);
  const n = Number(document.getElementById("sample-n").value);
  const temperature = Number(document.getElementById("sample-temperature").value);
  try {
    const answer = await call("/v1/sample", { method: "POST", json: { n, seed, temperature } });
    const grid = element("figure", { class: "sample-grid", "data-seed": String(seed) },
      element("img", { src: pngSource(answer.grid_png), alt: `samples, seed ${seed}` }),
      element("figcaption", {}, `seed ${seed} · ${n} images · temperature ${temperature}`));
    if (append) grids.prepend(grid);
    else grids.replaceChildren(grid);
    nextSeed = seed + 1;
    seedInput.value = String(seed);
  } catch (error) {
    grids.prepend(element("p", { class: "error" }, `could not sample: ${error.message}`));
  }
}

async function interpolate() {
  const fileA = document.getElementById("interp-a").files[0];
  const fileB = document.getElementById("interp-b").files[0];
  const steps = Number(document.getElementById("interp-steps").value);
  const result = document.getElementById("interp-result");
  let request;
  try {
    if (fileA && fileB) {
      request = { images: await modelInputs([fileA, fileB]), steps };
    } else {
      const seeds = [document.getElementById("interp-seed-a"), document.getElementById("interp-seed-b")];
      request = { seeds: seeds.map((input) => Number(input.value)), steps };
    }
    const answer = await call("/v1/interpolate", { method: "POST", json: request });
    const slider = document.getElementById("interp-slider");
    const image = document.getElementById("interp-image");
    slider.max = String(answer.images_png.length - 1);
    slider.value = "0";
    image.src = pngSource(answer.images_png[0]);
    slider.oninput = () => { image.src = pngSource(answer.images_png[Number(slider.value)]); };
    document.getElementById("interp-strip").src = pngSource(answer.grid_png);
    result.hidden = false;
  } catch (error) {
    result.hidden = false;
    result.prepend(element("p", { class: "error" }, `could not interpolate: ${error.message}`));
  }
}

export function setUpGenerate() {
  document.getElementById("sample-form").addEventListener("submit", (event) => {
    event.preventDefault();
    drawSamples({ append: false });
  });
  document.getElementById("sample-more").addEventListener("click", () => drawSamples({ append: true }));
  document.getElementById("interp-form").addEventListener("submit", (event) => {
    event.preventDefault();
    interpolate();
  });
}
