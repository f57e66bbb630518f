
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img.map"), ok = 0;
  imgs.forEach(function (im) {
    if (im.complete && im.naturalWidth > 0) { ok++; }
    else { im.closest(".card").classList.add("broken"); }
  });
  document.body.setAttribute("data-images-loaded", ok);
  document.body.setAttribute("data-images-total", imgs.length);
  if (ok < imgs.length) {
    var n = document.getElementById("missing-maps");
    n.textContent = (imgs.length - ok) + " of " + imgs.length +
      " heatmaps could not be loaded (moved, deleted, or the report was copied without " +
      "its _maps folder).";
    n.hidden = false;
  }
});
