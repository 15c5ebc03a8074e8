// SPDX-License-Identifier: Apache-2.0
#pragma once

// A very small SVG writer for the examples' figures: line plots (axes, "nice" ticks, legend,
// title, optional log-scale y) and grids of heat maps with a colour bar. No dependency beyond
// the standard library; the output is plain SVG 1.1 text that browsers and GitHub render.
// Numbers are printed with a fixed format, so the same data gives the same bytes.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace toy_svg {

/// One curve of a line plot.
struct Series {
  std::string label;
  std::vector<double> x, y;
  std::string color = "#1f77b4";
  bool dashed = false;
};

/// A line plot.
struct LinePlot {
  std::string title, x_label, y_label;
  std::vector<Series> series;
  bool log_y = false;
  double width = 720, height = 440;
};

/// One heat map of a grid: rows x cols values in [0, vmax], row-major.
struct HeatMap {
  std::string title;
  int rows = 0, cols = 0;
  std::vector<double> values;
};

/// A grid of heat maps sharing one colour scale [0, vmax].
struct HeatGrid {
  std::string title, row_label, col_label, scale_label;
  int grid_rows = 1, grid_cols = 1;
  std::vector<HeatMap> maps;  // grid_rows * grid_cols, row-major
  double vmax = 1.0;
};

namespace detail {

inline std::string num(double v, int digits = 2) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", digits, v);
  return buffer;
}

inline std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

inline std::string text(double x, double y, const std::string& s, const char* anchor = "middle",
                        int size = 12, const char* extra = "") {
  return "<text x=\"" + num(x, 1) + "\" y=\"" + num(y, 1) + "\" font-size=\"" +
         std::to_string(size) + "\" text-anchor=\"" + anchor + "\"" + extra + ">" + escape(s) +
         "</text>\n";
}

// Ticks at multiples of 1, 2 or 5 x 10^e covering [lo, hi] with about `target` intervals.
inline std::vector<double> nice_ticks(double lo, double hi, int target = 6) {
  std::vector<double> ticks;
  if (!(hi > lo)) {
    ticks.push_back(lo);
    return ticks;
  }
  const double raw = (hi - lo) / target;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  double step = magnitude;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * magnitude >= raw) {
      step = m * magnitude;
      break;
    }
  }
  for (double t = std::ceil(lo / step - 1e-9) * step; t <= hi + 1e-9 * step; t += step) {
    ticks.push_back(std::abs(t) < 1e-12 * step ? 0.0 : t);
  }
  return ticks;
}

inline std::string tick_label(double v, double step) {
  if (step >= 1.0 || v == 0.0) return num(v, 0);
  const int digits = std::min(6, int(std::ceil(-std::log10(step) - 1e-9)));
  return num(v, digits);
}

// Colour of a value in [0, 1]: white to dark blue, readable in print.
inline std::string blue(double t) {
  t = std::clamp(t, 0.0, 1.0);
  const int r = int(std::lround(255 - t * (255 - 8))), g = int(std::lround(255 - t * (255 - 48))),
            b = int(std::lround(255 - t * (255 - 107)));
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "#%02x%02x%02x", r, g, b);
  return buffer;
}

inline std::string header(double width, double height) {
  return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(width, 0) + "\" height=\"" +
         num(height, 0) + "\" viewBox=\"0 0 " + num(width, 0) + " " + num(height, 0) +
         "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
         "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
}

}  // namespace detail

namespace detail {

// The elements of a line plot (no <svg> wrapper); `id` names its clip path.
inline std::string line_plot_body(const LinePlot& plot, const std::string& id) {
  const double left = 78, right = 190, top = 40, bottom = 56;
  const double w = plot.width - left - right, h = plot.height - top - bottom;
  double x_lo = 1e300, x_hi = -1e300, y_lo = 1e300, y_hi = -1e300;
  for (const Series& s : plot.series) {
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      const double y = s.y[i];
      if (!std::isfinite(y) || (plot.log_y && y <= 0)) continue;
      x_lo = std::min(x_lo, s.x[i]);
      x_hi = std::max(x_hi, s.x[i]);
      y_lo = std::min(y_lo, y);
      y_hi = std::max(y_hi, y);
    }
  }
  if (x_lo > x_hi) x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;
  std::vector<double> y_ticks;
  std::vector<std::string> y_tick_labels;
  if (plot.log_y) {
    // A little room around the data; ticks at m x 10^e inside the range (more mantissas m when
    // the range spans less than about a decade).
    y_lo *= 0.9;
    y_hi *= 1.1;
    const std::vector<double> mantissas = y_hi / y_lo < 12
                                              ? std::vector<double>{1, 1.5, 2, 3, 4, 5, 6, 8}
                                              : std::vector<double>{1, 2, 5};
    for (int e = int(std::floor(std::log10(y_lo))); e <= int(std::ceil(std::log10(y_hi))); ++e) {
      for (double m : mantissas) {
        const double t = m * std::pow(10.0, e);
        if (t < y_lo || t > y_hi) continue;
        y_ticks.push_back(t);
        y_tick_labels.push_back(num(t, (e >= 0 ? 0 : -e) + (m == 1.5 ? 1 : 0)));
      }
    }
  } else {
    if (y_lo >= 0) y_lo = 0;  // non-negative data: the axis starts at 0
    const std::vector<double> ticks = nice_ticks(y_lo, y_hi);
    const double step = ticks.size() > 1 ? ticks[1] - ticks[0] : 1.0;
    y_lo = std::min(y_lo, ticks.front());
    y_hi = std::max(y_hi, ticks.back());
    if (y_hi < y_lo + step * 0.5) y_hi = y_lo + step;
    for (double t : ticks) {
      y_ticks.push_back(t);
      y_tick_labels.push_back(tick_label(t, step));
    }
  }
  auto px = [&](double x) { return left + (x - x_lo) / (x_hi - x_lo) * w; };
  auto py = [&](double y) {
    const double u = plot.log_y ? (std::log10(y) - std::log10(y_lo)) /
                                      (std::log10(y_hi) - std::log10(y_lo))
                                : (y - y_lo) / (y_hi - y_lo);
    return top + h - u * h;
  };
  std::string svg;
  svg += text(left + w / 2, 24, plot.title, "middle", 15, " font-weight=\"bold\"");
  // Grid and ticks.
  for (std::size_t i = 0; i < y_ticks.size(); ++i) {
    const double y = py(y_ticks[i]);
    svg += "<line x1=\"" + num(left, 1) + "\" y1=\"" + num(y, 1) + "\" x2=\"" + num(left + w, 1) +
           "\" y2=\"" + num(y, 1) + "\" stroke=\"#e5e5e5\"/>\n";
    svg += text(left - 6, y + 4, y_tick_labels[i], "end", 11);
  }
  const std::vector<double> x_ticks = nice_ticks(x_lo, x_hi);
  const double x_step = x_ticks.size() > 1 ? x_ticks[1] - x_ticks[0] : 1.0;
  for (double t : x_ticks) {
    const double x = px(t);
    svg += "<line x1=\"" + num(x, 1) + "\" y1=\"" + num(top, 1) + "\" x2=\"" + num(x, 1) +
           "\" y2=\"" + num(top + h, 1) + "\" stroke=\"#e5e5e5\"/>\n";
    svg += text(x, top + h + 16, tick_label(t, x_step), "middle", 11);
  }
  svg += "<rect x=\"" + num(left, 1) + "\" y=\"" + num(top, 1) + "\" width=\"" + num(w, 1) +
         "\" height=\"" + num(h, 1) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  svg += text(left + w / 2, plot.height - 14, plot.x_label, "middle", 13);
  svg += "<text x=\"18\" y=\"" + num(top + h / 2, 1) + "\" font-size=\"13\" text-anchor=\"middle\" "
         "transform=\"rotate(-90 18 " + num(top + h / 2, 1) + ")\">" + escape(plot.y_label) +
         "</text>\n";
  // Curves, clipped to the plot area.
  svg += "<clipPath id=\"" + id + "\"><rect x=\"" + num(left, 1) + "\" y=\"" + num(top, 1) +
         "\" width=\"" + num(w, 1) + "\" height=\"" + num(h, 1) + "\"/></clipPath>\n";
  for (const Series& s : plot.series) {
    std::string points;
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || (plot.log_y && s.y[i] <= 0)) continue;
      points += num(px(s.x[i]), 1) + "," + num(py(s.y[i]), 1) + " ";
    }
    svg += "<polyline clip-path=\"url(#" + id + ")\" fill=\"none\" stroke=\"" + s.color +
           "\" stroke-width=\"1.8\"" + (s.dashed ? " stroke-dasharray=\"6 4\"" : "") +
           " points=\"" + points + "\"/>\n";
  }
  // Legend on the right.
  double ly = top + 8;
  for (const Series& s : plot.series) {
    const double lx = left + w + 14;
    svg += "<line x1=\"" + num(lx, 1) + "\" y1=\"" + num(ly, 1) + "\" x2=\"" + num(lx + 26, 1) +
           "\" y2=\"" + num(ly, 1) + "\" stroke=\"" + s.color + "\" stroke-width=\"2.2\"" +
           (s.dashed ? " stroke-dasharray=\"6 4\"" : "") + "/>\n";
    svg += text(lx + 32, ly + 4, s.label, "start", 11);
    ly += 19;
  }
  return svg;
}

}  // namespace detail

/// The SVG text of a line plot.
inline std::string render(const LinePlot& plot) {
  return detail::header(plot.width, plot.height) + detail::line_plot_body(plot, "area0") +
         "</svg>\n";
}

/// The SVG text of line plots side by side (one figure).
inline std::string render_row(const std::vector<LinePlot>& plots) {
  double width = 0, height = 0;
  for (const LinePlot& p : plots) {
    width += p.width;
    height = std::max(height, p.height);
  }
  std::string svg = detail::header(width, height);
  double x = 0;
  for (std::size_t i = 0; i < plots.size(); ++i) {
    svg += "<g transform=\"translate(" + detail::num(x, 0) + ",0)\">\n" +
           detail::line_plot_body(plots[i], "area" + std::to_string(i)) + "</g>\n";
    x += plots[i].width;
  }
  return svg + "</svg>\n";
}

/// The SVG text of a grid of heat maps (one shared colour scale, values printed in the cells).
inline std::string render(const HeatGrid& grid) {
  using namespace detail;
  const double cell = 26, gap_x = 46, gap_y = 58, left = 96, top = 64;
  const int rows = grid.maps.empty() ? 0 : grid.maps.front().rows;
  const int cols = grid.maps.empty() ? 0 : grid.maps.front().cols;
  const double map_w = cols * cell, map_h = rows * cell;
  const double width = left + grid.grid_cols * map_w + (grid.grid_cols - 1) * gap_x + 110;
  const double height = top + grid.grid_rows * map_h + (grid.grid_rows - 1) * gap_y + 46;
  std::string svg = header(width, height);
  svg += text(width / 2, 24, grid.title, "middle", 15, " font-weight=\"bold\"");
  for (int gr = 0; gr < grid.grid_rows; ++gr) {
    for (int gc = 0; gc < grid.grid_cols; ++gc) {
      const std::size_t index = std::size_t(gr * grid.grid_cols + gc);
      if (index >= grid.maps.size()) continue;
      const HeatMap& m = grid.maps[index];
      const double x0 = left + gc * (map_w + gap_x), y0 = top + gr * (map_h + gap_y);
      svg += text(x0 + map_w / 2, y0 - 10, m.title, "middle", 12, " font-weight=\"bold\"");
      for (int r = 0; r < m.rows; ++r) {
        for (int c = 0; c < m.cols; ++c) {
          const double v = m.values[std::size_t(r * m.cols + c)];
          const double t = v / grid.vmax;
          svg += "<rect x=\"" + num(x0 + c * cell, 1) + "\" y=\"" + num(y0 + r * cell, 1) +
                 "\" width=\"" + num(cell, 1) + "\" height=\"" + num(cell, 1) + "\" fill=\"" +
                 blue(t) + "\" stroke=\"#ccc\" stroke-width=\"0.5\"/>\n";
          svg += text(x0 + c * cell + cell / 2, y0 + r * cell + cell / 2 + 3.5,
                      num(std::round(v * 100), 0), "middle", 9,
                      t > 0.55 ? " fill=\"white\"" : " fill=\"#333\"");
        }
        if (gc == 0) {
          svg += text(x0 - 6, y0 + r * cell + cell / 2 + 4, grid.row_label + " " + std::to_string(r),
                      "end", 11);
        }
      }
      for (int c = 0; c < m.cols; ++c) {
        svg += text(x0 + c * cell + cell / 2, y0 + map_h + 13, std::to_string(c), "middle", 10);
      }
      svg += text(x0 + map_w / 2, y0 + map_h + 27, grid.col_label, "middle", 11);
    }
  }
  // Colour bar.
  const double bx = width - 70, by = top, bh = grid.grid_rows * map_h + (grid.grid_rows - 1) * gap_y;
  const int steps = 20;
  for (int i = 0; i < steps; ++i) {
    const double t0 = double(i) / steps;
    svg += "<rect x=\"" + num(bx, 1) + "\" y=\"" + num(by + bh - (i + 1) * bh / steps, 1) +
           "\" width=\"14\" height=\"" + num(bh / steps + 0.5, 1) + "\" fill=\"" +
           blue(t0 + 0.5 / steps) + "\"/>\n";
  }
  svg += "<rect x=\"" + num(bx, 1) + "\" y=\"" + num(by, 1) + "\" width=\"14\" height=\"" +
         num(bh, 1) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  for (double t : {0.0, 0.5, 1.0}) {
    svg += text(bx + 18, by + bh - t * bh + 4, num(t * grid.vmax * 100, 0) + "%", "start", 10);
  }
  svg += "<text x=\"" + num(bx + 52, 1) + "\" y=\"" + num(by + bh / 2, 1) +
         "\" font-size=\"11\" text-anchor=\"middle\" transform=\"rotate(90 " + num(bx + 52, 1) +
         " " + num(by + bh / 2, 1) + ")\">" + escape(grid.scale_label) + "</text>\n";
  svg += "</svg>\n";
  return svg;
}

}  // namespace toy_svg
